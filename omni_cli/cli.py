"""The `omni` command: parses options, builds objects, and calls one function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from omni_cli.errors import OmniError

app = typer.Typer(
    name="omni",
    help="A local voice assistant: speak to LLaMA-Omni and hear the answer while it is written.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="LLaMA-Omni checkpoint directory (config.json + safetensors + tokenizer).")]
EncoderOpt = Annotated[
    Optional[Path],
    typer.Option("--speech-encoder", help="Whisper-large-v3: a transformers directory or openai-whisper large-v3.pt. Default: the path in config.json."),
]
VocoderOpt = Annotated[
    Optional[Path],
    typer.Option("--vocoder", help="Unit HiFi-GAN directory (config.json + g_00500000 or vocoder.safetensors). Without it, replies are text only."),
]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16, 8bit, 4bit.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1 or cpu. Default: cuda when available.")]


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    typer.echo(f"omni: error: {message}", err=True)
    raise typer.Exit(code)


def build_pipeline(
    model: Path,
    speech_encoder: Path | None,
    vocoder: Path | None,
    precision: str,
    device: str | None,
    max_new_tokens: int,
    temperature: float,
    chunk_units: int,
    first_chunk_units: int | None,
):  # noqa: ANN201 - returns SpeechToSpeech; imported lazily so `omni --help` stays fast
    """Load the model (and vocoder) and wrap them in the streaming pipeline."""
    from omni_cli.model.llm import SamplingConfig
    from omni_cli.model.loading import load_omni, resolve_placement
    from omni_cli.model.vocoder import load_vocoder
    from omni_cli.pipeline import SpeechToSpeech, StreamingConfig

    # The vocoder is small: load it first so a wrong --vocoder fails before the LLM loads.
    placement = resolve_placement(precision, device)
    voc = None if vocoder is None else load_vocoder(vocoder, dtype=placement.dtype, device=placement.device)
    loaded = load_omni(model, speech_encoder, precision=precision, device=device)
    streaming = StreamingConfig(
        chunk_units=chunk_units,
        first_chunk_units=first_chunk_units,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
    )
    return SpeechToSpeech(loaded, voc, streaming)


@app.command("transcribe-and-reply")
def transcribe_and_reply_cmd(
    files: Annotated[list[Path], typer.Argument(help="Audio files with a spoken question each (any rate/format soundfile reads).")],
    model: ModelOpt,
    speech_encoder: EncoderOpt = None,
    vocoder: VocoderOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the spoken reply to OUT/<name>.wav (needs --vocoder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file: text, units, wav, timings.")] = False,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy, as the reference.")] = 0.0,
    chunk_units: Annotated[int, typer.Option(min=1, help="Units per audio chunk (Ω).")] = 40,
    first_chunk_units: Annotated[Optional[int], typer.Option(min=1, help="Smaller first chunk for earlier first sound.")] = None,
) -> None:
    """Answer each spoken question file: the reply text streams to stdout, its speech goes to --out.

    Example:\n
      omni transcribe-and-reply question.wav --model ./Llama-3.1-8B-Omni --speech-encoder ./whisper-large-v3 --vocoder ./vocoder --out replies/
    """
    from omni_cli.transcribe import transcribe_and_reply

    if out is not None and vocoder is None:
        fail("--out writes the spoken reply and needs --vocoder DIR (the unit HiFi-GAN).")
    try:
        pipeline = build_pipeline(model, speech_encoder, vocoder, precision, device, max_new_tokens, temperature, chunk_units, first_chunk_units)
    except OmniError as exc:
        fail(str(exc))
    failed = transcribe_and_reply(pipeline, files, out, as_json)
    if failed:
        raise typer.Exit(1)


@app.command("make-tiny", hidden=True)
def make_tiny_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the tiny model into.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny random LLaMA-Omni (checkpoint, Whisper, vocoder) in the released formats, for smoke tests."""
    from omni_cli.tiny.omni import make_tiny_model

    paths = make_tiny_model(out, seed=seed)
    typer.echo(f"--model {paths.model_dir} --speech-encoder {paths.speech_encoder} --vocoder {paths.vocoder_dir}")


def main() -> None:
    """Entry point for `python -m omni_cli`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
