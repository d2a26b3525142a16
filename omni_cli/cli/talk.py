"""`omni chat`, `omni transcribe-and-reply` and `omni devices`: talking to the model."""

from __future__ import annotations

import sys
from pathlib import Path
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
from omni_cli.config import CHAT_FIRST_CHUNK_UNITS, ChatOptions
from omni_cli.errors import OmniError


@app.command("transcribe-and-reply")
def transcribe_and_reply_cmd(
    files: Annotated[
        list[Path],
        # readable=False: an unreadable file is reported by omni's own checks, and the others still answered.
        typer.Argument(help="Audio files with a spoken question each (any rate/format soundfile reads).", readable=False, metavar="FILE"),
    ],
    model: ModelOpt,
    speech_encoder: EncoderOpt = None,
    vocoder: VocoderOpt = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o",
            help="Write each spoken reply to OUT/<name>.wav (needs --vocoder; created if missing). An existing file is "
            "never replaced: a taken name (an input, an earlier reply, two inputs named alike) gets -2, -3, ... A reply "
            "cut short by Ctrl-C or an error is saved only as <name>.partial.wav.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file: text, units, wav, timings.")] = False,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = None,
    max_new_tokens: MaxNewTokensOpt = SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = STREAMING.chunk_units,
    first_chunk_units: Annotated[Optional[int], typer.Option(min=1, help="Smaller first chunk for earlier first sound.")] = STREAMING.first_chunk_units,
    decode_steps: DecodeStepsOpt = DecodeSteps(STREAMING.decode_steps),
    context_budget: ContextBudgetOpt = STREAMING.context_budget,
    threads: ThreadsOpt = None,
    yes: YesOpt = False,
) -> None:
    """Answer each spoken question file: the reply text streams to stdout, its speech goes to --out.

    Every file and --out are checked before the model loads; a bad file gets one error line and
    the others are still answered (exit status 1). Ctrl-C stops the reply in progress, keeps it
    as <name>.partial.wav, names the files still to answer and exits with 130.

    Example:\n
      omni transcribe-and-reply question.wav --model ./Llama-3.1-8B-Omni --speech-encoder ./whisper-large-v3 --vocoder ./vocoder --out replies/
    """
    from omni_cli.transcribe import (
        EXIT_INTERRUPTED,
        check_inputs,
        check_out_dir,
        transcribe_and_reply,
    )
    from omni_cli.weights.presets import looks_like_preset

    if out is not None and vocoder is None and not looks_like_preset(model):
        fail("--out writes the spoken reply and needs --vocoder DIR (the unit HiFi-GAN).")
    try:
        if out is not None:
            check_out_dir(out)
        inputs = check_inputs(files, sys.stderr)
        pipeline = None
        if any(item.error is None for item in inputs):
            streaming = streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value, context_budget)
            pipeline = load_pipeline(model, speech_encoder, vocoder, precision.value, device, streaming, assume_yes=yes, threads=threads)
    except OmniError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        echo_err("omni: interrupted before any file was answered; no reply was written. Run the command again to answer them.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    code = transcribe_and_reply(pipeline, inputs, out, as_json)
    if code == EXIT_INTERRUPTED:  # every reply is saved and said: whoever pressed Ctrl-C wants out, not torch's teardown
        exit_fast_at_the_end()
    raise typer.Exit(code)


@app.command("chat")
def chat_cmd(
    model: ModelOpt,
    speech_encoder: EncoderOpt = None,
    vocoder: VocoderOpt = None,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = None,
    input_device: Annotated[Optional[str], typer.Option("--input-device", help="Microphone: index or (part of a) name from `omni devices`. Default: the system's.")] = None,
    output_device: Annotated[Optional[str], typer.Option("--output-device", help="Speaker: index or (part of a) name from `omni devices`. Default: the system's.")] = None,
    text: Annotated[bool, typer.Option("--text", help="Type questions instead of speaking (replies are still spoken with --vocoder).")] = False,
    barge_in: Annotated[
        bool,
        typer.Option(
            "--barge-in",
            help="Speaking over a reply stops it and starts your next turn, always (headphones). Default: barge-in is on "
            "once the echo canceller has learnt the room (from a soft 0.8 s hiss at the start; half-duplex until then).",
        ),
    ] = False,
    half_duplex: Annotated[
        bool,
        typer.Option("--half-duplex", help="Never barge in: what the microphone hears while omni speaks is ignored (no echo canceller)."),
    ] = False,
    aec: Annotated[
        bool,
        typer.Option(
            "--aec/--no-aec",
            help="Echo cancellation (WebRTC AEC3): remove omni's own voice from the microphone, so you can interrupt it "
            "on open speakers. --no-aec: half-duplex unless --barge-in.",
        ),
    ] = ChatOptions.echo_cancellation,
    session_dir: Annotated[Optional[Path], typer.Option("--session-dir", help="Where the transcript.jsonl and turn WAVs go. Default: ./omni-sessions/<timestamp>.")] = None,
    max_new_tokens: MaxNewTokensOpt = SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = STREAMING.chunk_units,
    first_chunk_units: Annotated[int, typer.Option(min=1, help="Units in the first chunk: smaller = first sound sooner.")] = CHAT_FIRST_CHUNK_UNITS,
    hangover_ms: Annotated[int, typer.Option(min=30, help="Silence that ends your turn, in ms (half-duplex; see --answer-after-ms).")] = ChatOptions.hangover_ms,
    answer_after_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="While omni can hear you over itself (full duplex), answer after this much silence; if you go on, the "
            "reply stops and what you say joins the question. 0: wait --hangover-ms.",
        ),
    ] = ChatOptions.answer_after_ms,
    speculate_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="Start preparing the reply after this much silence, while --hangover-ms runs; it is played only if your "
            "turn ends there and dropped if you speak on. 0: wait for the end of the turn.",
        ),
    ] = ChatOptions.speculate_ms,
    vad_aggressiveness: Annotated[int, typer.Option(min=0, max=3, help="webrtcvad: 0 keeps most audio as speech, 3 the least.")] = ChatOptions.vad_aggressiveness,
    context_budget: ContextBudgetOpt = STREAMING.context_budget,
    decode_steps: DecodeStepsOpt = DecodeSteps(STREAMING.decode_steps),
    threads: ThreadsOpt = None,
    yes: YesOpt = False,
) -> None:
    """Talk with the model: speak, see the reply written and hear it spoken; earlier turns are remembered.

    Ctrl-C ends the session: the reply in progress is cut and everything said so far is saved (transcript.jsonl + turn WAVs in --session-dir). Exit status 0 after Ctrl-C or end of typed input.

    Examples:\n
      omni chat --model ./Llama-3.1-8B-Omni --speech-encoder ./whisper-large-v3 --vocoder ./vocoder\n
      omni chat --model ./Llama-3.1-8B-Omni --vocoder ./vocoder --barge-in --input-device "USB Headset"\n
      omni chat --model ./Llama-3.1-8B-Omni --vocoder ./vocoder --half-duplex\n
      omni chat --model ./Llama-3.1-8B-Omni --text
    """
    if barge_in and half_duplex:
        fail("--barge-in (interrupt omni by speaking) and --half-duplex (never) contradict each other; give one of them.")
    if text:
        _typed_text_decodes()
    exit_fast_at_the_end()  # see main(): tearing torch down after "session saved" took 4-7 s
    folder: Path | None = None
    try:
        from omni_cli.chat.view import ChatView
        from omni_cli.terminal import NativeStderr

        view = ChatView()
        # ALSA/PortAudio print to file descriptor 2 from the first device check on: into a log
        # (the session folder's native.log), never over the screen.
        with NativeStderr() as native_log:  # before the spinner: rich's live display wraps sys.stderr as it finds it
            try:
                view.loading("checking the model files")  # torch-free, like everything up to "starting torch"
                from omni_cli.setup.prepare import check_model_files

                files = check_model_files(model, speech_encoder, vocoder)
                view.loading("checking the microphone" if not text else "checking the session folder")  # before PortAudio, torch
                from omni_cli.chat.preflight import preflight
                from omni_cli.chat.transcript import default_session_dir

                folder = session_dir or default_session_dir()
                options = ChatOptions(
                    session_dir=folder,
                    text=text,
                    barge_in=True if barge_in else False if half_duplex else None,
                    echo_cancellation=aec,
                    input_device=input_device,
                    output_device=output_device,
                    hangover_ms=hangover_ms,
                    answer_after_ms=answer_after_ms,
                    speculate_ms=speculate_ms,
                    vad_aggressiveness=vad_aggressiveness,
                )
                preflight(options)  # torch-free: a wrong device is one line within 2 s
                view.loading("starting torch")
                from omni_cli.chat.devices import run_chat

                streaming = streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value, context_budget)
                pipeline = load_pipeline(
                    model, speech_encoder, vocoder, precision.value, device, streaming, assume_yes=yes, threads=threads,
                    show=view.loading, files=files,
                )
                code = run_chat(pipeline, options, view, native_log=native_log)
            except OmniError as exc:
                view.stop()
                fail(str(exc))
            finally:
                view.stop()
            if native_log.path is not None and native_log.captured():
                view.note(f"messages from the native libraries (ALSA, PortAudio, ...) are in {native_log.path}")
    except KeyboardInterrupt:  # Ctrl-C before the session took it over (loading, opening the devices): typer would exit 130 silently
        echo_err(_interrupted(folder))
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _typed_text_decodes() -> None:
    """Typed questions never fail to decode: bytes that are not text in the terminal's encoding become U+FFFD
    (a traceback at the first non-UTF-8 byte lost the session)."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")


def _interrupted(folder: Path | None) -> str:
    """The line for a Ctrl-C that came before the session could end itself cleanly."""
    from omni_cli.chat.transcript import TRANSCRIPT_NAME

    if folder is not None and (folder / TRANSCRIPT_NAME).is_file():
        return f"omni: interrupted; the session so far is saved in {folder}."
    return "omni: interrupted while starting; nothing was saved."


@app.command("devices")
def devices_cmd() -> None:
    """List audio input and output devices with their default rates; pass # or a name to --input-device/--output-device."""
    from rich.console import Console

    from omni_cli.audio.devices import list_devices
    from omni_cli.chat.view import devices_table

    try:
        devices = list_devices()
    except OmniError as exc:
        fail(str(exc), code=1)
    if not devices:
        typer.echo("omni: no audio devices found; connect one or start a sound server (PulseAudio/PipeWire).")
        return
    Console().print(devices_table(devices))


