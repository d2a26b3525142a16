"""The `omni` Typer app, the options several commands share, and the entry point.

Importing it does not import torch (option defaults and choices come from the torch-free
`config.py`), so `omni --help` and option errors are instant; each command imports what it
needs when it runs. The commands themselves live beside this file, one module per family.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from omni_cli.config import (
    DECODE_MODES,
    PRECISIONS,
    TRAIN_PRECISIONS,
    SamplingConfig,
    StreamingConfig,
)

if TYPE_CHECKING:
    from omni_cli.pipeline import SpeechToSpeech
    from omni_cli.weights.model_files import ModelFiles



class _OneLineErrors(TyperGroup):
    """Typer's command group, except that a mistyped command line is one line like every other
    omni error (`omni: error: ...`), not a framed panel."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except Exception as exc:
            # Usage errors (typer vendors click, so matched by shape, not class): one line, exit 2.
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                message = exc.format_message().replace("Value error, ", "").rstrip(".")
                where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
                typer.echo(f"omni: error: {message}{where}.", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="omni",
    help="A local voice assistant: speak to LLaMA-Omni and hear the answer while it is written.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Choices checked while parsing, before anything loads; the names come from config.py.
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)  # type: ignore[misc]
TrainPrecision = Enum("TrainPrecision", {p: p for p in TRAIN_PRECISIONS}, type=str)  # type: ignore[misc]
DecodeSteps = Enum("DecodeSteps", {m: m for m in DECODE_MODES}, type=str)  # type: ignore[misc]

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="LLaMA-Omni checkpoint directory (config.json + safetensors + tokenizer), or a preset name such as llama-omni-8b (downloaded on first use).")]
EncoderOpt = Annotated[
    Optional[Path],
    typer.Option("--speech-encoder", help="Whisper-large-v3: a transformers directory or openai-whisper large-v3.pt. Default: the path in config.json."),
]
VocoderOpt = Annotated[
    Optional[Path],
    typer.Option("--vocoder", help="Unit HiFi-GAN directory (config.json + g_00500000 or vocoder.safetensors). Without it, replies are text only."),
]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto = fp16 on CUDA, fp32 on CPU; 8bit/4bit need a CUDA GPU (bitsandbytes).")]
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _device_name(value: Optional[str]) -> Optional[str]:
    """--device checked while parsing, without importing torch: cpu, cuda or cuda:N."""
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device omni runs on; use cpu, cuda or cuda:N (e.g. cuda:1)")
    return value


DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", callback=_device_name, help="cuda, cuda:N (e.g. cuda:1) or cpu. Default: cuda when available.")
]
DecodeStepsOpt = Annotated[
    DecodeSteps,
    typer.Option(
        "--decode-steps",
        help="How the per-token steps of the LLM and the speech decoder run: eager (growing KV caches); static "
        "(preallocated KV caches); compiled (static + torch.compile, CUDA graphs on a GPU: a one-off compile at start).",
    ),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Download a preset's missing weights without asking.")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Longest reply in tokens.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy, as the reference.")]
ChunkUnitsOpt = Annotated[int, typer.Option(min=1, help="Units per audio chunk (Ω).")]
ContextBudgetOpt = Annotated[
    int,
    typer.Option(min=64, help="Prompt positions for the question, earlier turns and the reply: older turns are dropped beyond it, a longer question is refused."),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for the model. Default: OMP_NUM_THREADS if set, else all cores but one (left for audio and the screen)."),
]

SAMPLING = SamplingConfig()
STREAMING = StreamingConfig()
_exit_fast = False  # set by exit_fast_at_the_end(): the interpreter's own teardown is not worth waiting for (see main)


def exit_fast_at_the_end() -> None:
    """Called by a command after which the interpreter's teardown is not worth waiting for (see main)."""
    global _exit_fast
    _exit_fast = True


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one error line and exit."""
    typer.echo(f"omni: error: {message}", err=True)
    raise typer.Exit(code)


def echo_err(line: str) -> None:
    typer.echo(line, err=True)


def load_pipeline(
    model: Path, speech_encoder: Path | None, vocoder: Path | None, precision: str, device: str | None,
    streaming: StreamingConfig, assume_yes: bool = False, threads: int | None = None,
    show: Callable[[str | None], None] | None = None, files: ModelFiles | None = None,
) -> SpeechToSpeech:
    """--model (a directory or a preset, downloaded after asking) → the loaded streaming pipeline, compiled if asked.

    The model's files are checked before torch is imported (a wrong --model is one line at once);
    `files`, when the caller checked them already (`check_model_files`), are not read again.
    torch gets the interactive thread count (`threads.interactive_threads`). `show(what)` is told
    each slow step as it starts (None while a download may ask and draw its own progress).
    """
    from omni_cli.setup.prepare import check_model_files, prepare_model_files

    step = show or (lambda what: None)
    if files is None:
        files = check_model_files(model, speech_encoder, vocoder)  # torch-free: a wrong --model is one line at once
    if files is None:
        step(None)  # a preset's parts are to download: its question and progress bars need the screen
    confirm = (lambda question: typer.confirm(question, default=False)) if sys.stdin.isatty() else None
    files = prepare_model_files(
        model, speech_encoder, vocoder, precision, device, files=files, assume_yes=assume_yes, confirm=confirm, echo=echo_err
    )
    from omni_cli.pipeline import (
        SpeechToSpeech,  # imports torch: the slowest step of a start
    )
    from omni_cli.threads import interactive_threads, use_threads

    if show is not None:  # the caller shows progress; transformers' own bar inside its live display left a blank line
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    use_threads(interactive_threads(threads))
    step(f"loading the model from {files.model_dir}")
    pipeline = SpeechToSpeech.load(files, precision, device, streaming)
    if streaming.decode_steps == "compiled":
        if show is None:
            echo_err("Compiling the decoding steps (once per start; can take a minute)...")
        step("compiling the decoding steps (once per start; can take a minute)")
        problem = pipeline.warm_up()
        if problem:
            echo_err(f"omni: warning: {problem}")
    return pipeline


def streaming_config(
    max_new_tokens: int, temperature: float, chunk_units: int, first_chunk_units: int | None, decode_steps: str,
    context_budget: int = STREAMING.context_budget,
) -> StreamingConfig:
    """The reply options shared by chat and transcribe-and-reply."""
    return StreamingConfig(
        chunk_units=chunk_units,
        first_chunk_units=first_chunk_units,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
        context_budget=context_budget,
        decode_steps=decode_steps,
    )


def main() -> None:
    """Entry point of the `omni` command and `python -m omni_cli.cli`.

    After `omni chat` the process ends with os._exit once stdout and stderr are flushed: every
    file of the session is closed by then, and the interpreter's teardown (torch's modules, the
    audio libraries' exit handlers) took 4-7 s after "session saved". After any command, a
    Ctrl-C during that teardown ends the process at once with the command's exit status (it
    printed "Exception ignored in atexit callback ... KeyboardInterrupt"). Only here, never
    inside `app` (tests run it in-process with CliRunner).
    """
    global _teardown_exit
    try:
        try:
            app()
        finally:
            signal.signal(signal.SIGINT, _end_at_once)  # first thing once the command is over, however it ended
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _teardown_exit = code or 0
    except KeyboardInterrupt:  # a Ctrl-C after the command had said what it did, before the handler above took over
        _teardown_exit = 130
    else:
        _teardown_exit = 0
    if not _exit_fast:
        raise SystemExit(_teardown_exit)
    _flush_stdio()
    os._exit(_teardown_exit)


_teardown_exit = 130  # the status a Ctrl-C during the interpreter's teardown ends the process with


def _end_at_once(signum: int, frame: object) -> None:
    _flush_stdio()
    os._exit(_teardown_exit)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
