"""`omni serve`: the same model over the network — chat completions, the Realtime WebSocket and a page."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from omni_cli.cli.shared import (
    SAMPLING,
    STREAMING,
    ChunkUnitsOpt,
    ContextBudgetOpt,
    DecodeSteps,
    DecodeStepsOpt,
    DeviceOpt,
    EncoderOpt,
    MaxNewTokensOpt,
    ModelOpt,
    Precision,
    PrecisionOpt,
    TemperatureOpt,
    ThreadsOpt,
    VocoderOpt,
    YesOpt,
    app,
    echo_err,
    exit_fast_at_the_end,
    fail,
    load_pipeline,
    streaming_config,
)
from omni_cli.config import CHAT_FIRST_CHUNK_UNITS, ServeOptions
from omni_cli.errors import OmniError

SERVE = ServeOptions()


@app.command("serve")
def serve_cmd(
    model: ModelOpt,
    speech_encoder: EncoderOpt = None,
    vocoder: VocoderOpt = None,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on. Anything but loopback (127.0.0.1, localhost, ::1) needs --api-key.")
    ] = SERVE.host,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port; the ready line says which).")] = SERVE.port,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="OMNI_API_KEY",
            help="Require this key on every request (Authorization: Bearer KEY; the page: /?key=KEY). "
            "Also read from $OMNI_API_KEY, which keeps it out of the process list.",
            show_default=False,
        ),
    ] = None,
    model_name: Annotated[str, typer.Option("--model-name", help="The model id /v1/models lists and replies carry.")] = SERVE.model_name,
    max_waiting: Annotated[
        int, typer.Option("--max-waiting", min=0, help="Replies that may wait for the model (one is generated at a time); more are refused.")
    ] = SERVE.max_waiting,
    answer_after_ms: Annotated[
        int,
        typer.Option(
            "--answer-after-ms",
            min=0,
            help="Realtime sessions with barge-in on (interrupt_response) answer after this much silence, as omni chat does; "
            "if the user goes on within a second, the reply is cancelled and what they say joins the question. "
            "0: wait the session's silence_duration_ms.",
        ),
    ] = SERVE.answer_after_ms,
    max_new_tokens: MaxNewTokensOpt = SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = STREAMING.chunk_units,
    first_chunk_units: Annotated[int, typer.Option(min=1, help="Units in the first chunk: smaller = first sound sooner.")] = CHAT_FIRST_CHUNK_UNITS,
    context_budget: ContextBudgetOpt = STREAMING.context_budget,
    decode_steps: DecodeStepsOpt = DecodeSteps(STREAMING.decode_steps),
    threads: ThreadsOpt = None,
    yes: YesOpt = False,
) -> None:
    """Serve the model over HTTP: OpenAI-compatible chat completions (text and speech), the Realtime WebSocket, and a talk page at /.

    One reply is generated at a time; other requests wait their turn (up to --max-waiting). Ctrl-C stops the server.

    Examples:\n
      omni serve --model llama-omni-8b\n
      OMNI_API_KEY=secret omni serve --model llama-omni-8b --host 0.0.0.0 --port 8000
    """
    options = ServeOptions(
        host=host, port=port, api_key=api_key or None, model_name=model_name, max_waiting=max_waiting, answer_after_ms=answer_after_ms
    )
    if not options.loopback and options.api_key is None:
        fail(f"--host {host} lets other machines in: also pass --api-key KEY (or set OMNI_API_KEY), or keep the default --host 127.0.0.1.")
    from omni_cli.serve.server import bind, serve

    try:
        sock = bind(host, port)  # before the model loads: a taken port is one line at once
        exit_fast_at_the_end()  # see shared.main: torch's teardown is not worth waiting for
        streaming = streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value, context_budget)
        pipeline = load_pipeline(
            model, speech_encoder, vocoder, precision.value, device, streaming, assume_yes=yes, threads=threads,
            show=lambda what: echo_err(f"omni serve: {what}...") if what else None,
        )
    except OmniError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(serve(pipeline, options, sock))
