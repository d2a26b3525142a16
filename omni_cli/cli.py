"""The `omni` command: parses options, builds objects, and calls one function per command.

Importing this module does not import torch (option defaults and choices come from the
torch-free `config.py`), so `omni --help` and option errors are instant; each command imports
what it needs when it runs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from omni_cli.config import (
    CHAT_FIRST_CHUNK_UNITS,
    DECODE_MODES,
    PRECISIONS,
    TRAIN_PRECISIONS,
    ChatOptions,
    FinetuneConfig,
    SamplingConfig,
    StreamingConfig,
)
from omni_cli.errors import OmniError

if TYPE_CHECKING:
    from omni_cli.pipeline import SpeechToSpeech



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
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for the model. Default: OMP_NUM_THREADS if set, else all cores but one (left for audio and the screen)."),
]

_SAMPLING = SamplingConfig()
_STREAMING = StreamingConfig()
_exit_fast = False  # set by a command after which the interpreter's own teardown is not worth waiting for (see main)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one error line and exit."""
    typer.echo(f"omni: error: {message}", err=True)
    raise typer.Exit(code)


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


def load_pipeline(
    model: Path, speech_encoder: Path | None, vocoder: Path | None, precision: str, device: str | None,
    streaming: StreamingConfig, assume_yes: bool = False, threads: int | None = None,
    show: Callable[[str | None], None] | None = None,
) -> SpeechToSpeech:
    """--model (a directory or a preset, downloaded after asking) → the loaded streaming pipeline, compiled if asked.

    torch gets the interactive thread count (`threads.interactive_threads`). `show(what)` is told
    each slow step as it starts (None while a download may ask and draw its own progress).
    """
    from omni_cli.pipeline import SpeechToSpeech  # imports torch: the slowest step of a start
    from omni_cli.threads import interactive_threads, use_threads
    from omni_cli.setup.prepare import prepare_model_files

    step = show or (lambda what: None)
    if show is not None:  # the caller shows progress; transformers' own bar inside its live display left a blank line
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    confirm = (lambda question: typer.confirm(question, default=False)) if sys.stdin.isatty() else None
    step(None)
    files = prepare_model_files(
        model, speech_encoder, vocoder, precision, device, assume_yes=assume_yes, confirm=confirm, echo=_echo_err
    )
    use_threads(interactive_threads(threads))
    step(f"loading the model from {files.model_dir}")
    pipeline = SpeechToSpeech.load(files, precision, device, streaming)
    if streaming.decode_steps == "compiled":
        if show is None:
            _echo_err("Compiling the decoding steps (once per start; can take a minute)...")
        step("compiling the decoding steps (once per start; can take a minute)")
        problem = pipeline.warm_up()
        if problem:
            _echo_err(f"omni: warning: {problem}")
    return pipeline


def streaming_config(
    max_new_tokens: int, temperature: float, chunk_units: int, first_chunk_units: int | None, decode_steps: str,
    context_budget: int = _STREAMING.context_budget,
) -> StreamingConfig:
    """The reply options shared by chat and transcribe-and-reply."""
    return StreamingConfig(
        chunk_units=chunk_units,
        first_chunk_units=first_chunk_units,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
        context_budget=context_budget,
        decode_steps=decode_steps,
    )


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
    max_new_tokens: MaxNewTokensOpt = _SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = _SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = _STREAMING.chunk_units,
    first_chunk_units: Annotated[Optional[int], typer.Option(min=1, help="Smaller first chunk for earlier first sound.")] = _STREAMING.first_chunk_units,
    decode_steps: DecodeStepsOpt = DecodeSteps(_STREAMING.decode_steps),
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
    from omni_cli.transcribe import EXIT_INTERRUPTED, check_inputs, check_out_dir, transcribe_and_reply
    from omni_cli.weights.presets import looks_like_preset

    if out is not None and vocoder is None and not looks_like_preset(model):
        fail("--out writes the spoken reply and needs --vocoder DIR (the unit HiFi-GAN).")
    try:
        if out is not None:
            check_out_dir(out)
        inputs = check_inputs(files, sys.stderr)
        pipeline = None
        if any(item.error is None for item in inputs):
            streaming = streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value)
            pipeline = load_pipeline(model, speech_encoder, vocoder, precision.value, device, streaming, assume_yes=yes, threads=threads)
    except OmniError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        _echo_err("omni: interrupted before any file was answered; no reply was written. Run the command again to answer them.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(transcribe_and_reply(pipeline, inputs, out, as_json))


@app.command("make-tiny", hidden=True)
def make_tiny_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the tiny model into.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny random LLaMA-Omni (checkpoint, Whisper, vocoder) in the released formats, for smoke tests."""
    from omni_cli.tiny.omni import make_tiny_model

    paths = make_tiny_model(out, seed=seed)
    typer.echo(f"--model {paths.model_dir} --speech-encoder {paths.speech_encoder} --vocoder {paths.vocoder_dir}")


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
        Optional[bool],
        typer.Option(
            "--barge-in/--half-duplex",
            help="Speaking over a reply stops it and starts your next turn. Default: on once the echo canceller has "
            "learnt the room (the first few seconds of omni speaking are half-duplex); --barge-in: always (headphones); "
            "--half-duplex: never (what the microphone hears while omni speaks is ignored; no echo canceller).",
            show_default=False,
        ),
    ] = ChatOptions.barge_in,
    aec: Annotated[
        bool,
        typer.Option(
            "--aec/--no-aec",
            help="Echo cancellation (WebRTC AEC3): remove omni's own voice from the microphone, so you can interrupt it "
            "on open speakers. --no-aec: half-duplex unless --barge-in.",
        ),
    ] = ChatOptions.echo_cancellation,
    session_dir: Annotated[Optional[Path], typer.Option("--session-dir", help="Where the transcript.jsonl and turn WAVs go. Default: ./omni-sessions/<timestamp>.")] = None,
    max_new_tokens: MaxNewTokensOpt = _SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = _SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = _STREAMING.chunk_units,
    first_chunk_units: Annotated[int, typer.Option(min=1, help="Units in the first chunk: smaller = first sound sooner.")] = CHAT_FIRST_CHUNK_UNITS,
    hangover_ms: Annotated[int, typer.Option(min=30, help="Silence that ends your turn, in ms.")] = ChatOptions.hangover_ms,
    speculate_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="Start preparing the reply after this much silence, while --hangover-ms runs; it is played only if your "
            "turn ends there and dropped if you speak on. 0: wait for the end of the turn.",
        ),
    ] = ChatOptions.speculate_ms,
    vad_aggressiveness: Annotated[int, typer.Option(min=0, max=3, help="webrtcvad: 0 keeps most audio as speech, 3 the least.")] = ChatOptions.vad_aggressiveness,
    context_budget: Annotated[int, typer.Option(min=64, help="Prompt positions for memory: older turns are dropped beyond it.")] = _STREAMING.context_budget,
    decode_steps: DecodeStepsOpt = DecodeSteps(_STREAMING.decode_steps),
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
    global _exit_fast
    from omni_cli.chat.view import ChatView
    from omni_cli.terminal import NativeStderr

    _exit_fast = True  # see main(): tearing torch down after "session saved" took 4-7 s
    view = ChatView()
    # ALSA/PortAudio print to file descriptor 2 from the first device check on: into a log
    # (the session folder's native.log), never over the screen.
    with NativeStderr() as native_log:  # before the spinner: rich's live display wraps sys.stderr as it finds it
        try:
            view.loading("checking the microphone" if not text else "checking the session folder")  # before numpy, PortAudio, torch
            from omni_cli.chat.preflight import preflight
            from omni_cli.chat.transcript import default_session_dir

            options = ChatOptions(
                session_dir=session_dir or default_session_dir(),
                text=text,
                barge_in=barge_in,
                echo_cancellation=aec,
                input_device=input_device,
                output_device=output_device,
                hangover_ms=hangover_ms,
                speculate_ms=speculate_ms,
                vad_aggressiveness=vad_aggressiveness,
            )
            preflight(options)  # torch-free: a wrong device is one line within 2 s
            view.loading("starting torch")
            from omni_cli.chat.devices import run_chat

            streaming = streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value, context_budget)
            pipeline = load_pipeline(
                model, speech_encoder, vocoder, precision.value, device, streaming, assume_yes=yes, threads=threads, show=view.loading
            )
            code = run_chat(pipeline, options, view, native_log=native_log)
        except OmniError as exc:
            view.stop()
            fail(str(exc))
        finally:
            view.stop()
        if native_log.path is not None and native_log.captured():
            view.note(f"messages from the native libraries (ALSA, PortAudio, ...) are in {native_log.path}")
    raise typer.Exit(code)


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


@app.command("download")
def download_cmd(
    preset: Annotated[str, typer.Argument(help="Preset name (see --list) or a preset .toml file.")] = "llama-omni-8b",
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Put the weights here instead of the Hugging Face / omni caches.")] = None,
    units: Annotated[bool, typer.Option("--units", help="Also fetch mHuBERT and its k-means (the preset's units part) and convert them for `omni units`.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets with their download sizes.")] = False,
) -> None:
    """Download a preset's weights (hub parts into the Hugging Face cache, the vocoder converted to safetensors).

    Resumable: run it again after an interruption. Files the preset pins (size, SHA-256) are verified; for the others omni says they were NOT verified and prints what to pin. Afterwards everything runs offline (HF_HUB_OFFLINE=1).

    Examples:\n
      omni download llama-omni-8b\n
      omni download llama-omni-8b --local-dir ./weights\n
      omni download llama-omni-8b --units      # + mHuBERT and k-means for `omni units`
    """
    from omni_cli.setup.download import download_preset, format_gb
    from omni_cli.weights.presets import HUBERT_DIRNAME, KMEANS_CENTRES_NAME, get_preset, preset_names, resolve_preset, units_dir

    try:
        if list_presets:
            for name in preset_names():
                p = get_preset(name)
                typer.echo(f"{name}  {format_gb(sum(part.approx_size_bytes for part in p.parts))}  {p.description}")
            return
        chosen = get_preset(preset)
        if resolve_preset(chosen.source, local_dir).missing:
            _note_without_cuda(chosen.name, _echo_err)
        resolved = download_preset(chosen, local_dir, units=units, echo=_echo_err)
    except OmniError as exc:
        fail(str(exc), code=1)
    if local_dir is None:
        typer.echo(f"{chosen.name} is ready: omni chat --model {chosen.name}")
    else:
        paths = f"--model {resolved.model_dir} --speech-encoder {resolved.speech_encoder} --vocoder {resolved.vocoder_dir}"
        typer.echo(f"{chosen.name} is ready: omni chat {paths}")
    if units and chosen.units is not None:
        folder = units_dir(chosen.units, local_dir)
        typer.echo(f"unit targets: omni units ... --hubert {folder / HUBERT_DIRNAME} --kmeans {folder / KMEANS_CENTRES_NAME} --layer {chosen.units.layer}")


def _note_without_cuda(name: str, echo: Callable[[str], None]) -> None:
    """`omni download` on a machine without a CUDA GPU: say so first (the weights may be meant for another machine)."""
    from omni_cli.setup.fit import cuda_memory

    if cuda_memory() is None:
        echo(f"omni: note: no CUDA GPU is visible here; {name} needs one to run at a usable speed (see `omni doctor`). Downloading anyway.")


@app.command("doctor")
def doctor_cmd(
    preset: Annotated[str, typer.Option("--preset", help="Which model to check weights and GPU memory for.")] = "llama-omni-8b",
    precision: PrecisionOpt = Precision.auto,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Look for the weights here (as `omni download --local-dir`).")] = None,
) -> None:
    """Check Python, torch, CUDA and GPU memory, bitsandbytes, audio devices and weights; each line OK or what to do.

    Exit status 0 unless something required is broken (FIX lines); a missing GPU, sound card or weights is fine.
    """
    from omni_cli.setup.doctor import exit_code, run_checks

    checks = []
    for check in run_checks(preset, precision.value, local_dir):
        typer.echo(check.line)
        checks.append(check)
    raise typer.Exit(exit_code(checks))


def _positive_epochs(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter("must be more than 0 (a fraction such as 0.5 trains on part of the data)")
    return value


@app.command("finetune")
def finetune_cmd(
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: speech → text (adaptor + LLM). 2: text hidden states → speech units (speech decoder only).")],
    data: Annotated[Path, typer.Option("--data", help="Training manifest: the reference JSON list or JSONL (id, speech, conversations or messages, tgt_units).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the resume points checkpoint-N/ and the fine-tuned model OUTPUT/final.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="LLaMA-Omni checkpoint directory to start from (with --resume: only to name a base model that moved).")] = None,
    speech_encoder: EncoderOpt = None,
    epochs: Annotated[float, typer.Option(callback=_positive_epochs, help="Passes over the data (paper: 3); more than 0.")] = FinetuneConfig.epochs,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="The global batch: samples per optimizer step over all processes together (paper: 32).")] = FinetuneConfig.batch_size,
    micro_batch_size: Annotated[int, typer.Option("--micro-batch-size", min=1, help="At most this many samples per process in one forward pass; the rest of the batch is gradient accumulation (lower it if memory runs out).")] = FinetuneConfig.micro_batch_size,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: paper's 2e-5 stage 1, 2e-4 stage 2).")] = None,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", min=0.0, max=1.0, help="Linear warm-up share of the steps, then cosine decay.")] = FinetuneConfig.warmup_ratio,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Write a resume point every N steps (0: only at Ctrl-C).")] = FinetuneConfig.save_every,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", min=0, help="Resume points kept in OUTPUT, the newest (0: all).")] = FinetuneConfig.keep_checkpoints,
    seed: Annotated[int, typer.Option(help="Random seed (data order).")] = FinetuneConfig.seed,
    precision: Annotated[TrainPrecision, typer.Option("--precision", help="auto = bf16 (fp16 without bf16 support) mixed precision on CUDA, fp32 on CPU.")] = TrainPrecision(FinetuneConfig.precision),
    device: DeviceOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue from a checkpoint-N directory (or the --output of an earlier run: its newest).")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Stage 1: train LoRA adapters on the LLM instead of all its weights (needs peft).")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Stage 1: LoRA (implies --lora) with the LLM kept in 4 bit (bitsandbytes, CUDA).")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="Rank of each LoRA adapter (alpha = 2 × rank).")] = FinetuneConfig.lora_rank,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Stage 1 full fine-tuning sharded over the torchrun processes (FSDP2) instead of DDP.")] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Data-loader worker processes.")] = FinetuneConfig.num_workers,
) -> None:
    """Fine-tune on your own data: stage 1 (speech → text) or stage 2 (speech decoder).

    Every record is validated before the first step. Ctrl-C stops after the current step with a
    resume point (twice: at once, unsaved). Several GPUs: torchrun --nproc_per_node N -m omni_cli.cli finetune ...\n
    Example:\n
      omni finetune --stage 1 --data train.jsonl --model ./Llama-3.1-8B-Omni --speech-encoder ./whisper-large-v3 --output runs/s1
    """
    from omni_cli.train.progress import TrainProgress
    from omni_cli.train.trainer import finetune

    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        cfg = FinetuneConfig(
            stage=stage, data=data, output=output, model=model, speech_encoder=speech_encoder, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
            warmup_ratio=warmup_ratio, save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed, precision=precision.value, device=device,
            resume=resume, lora=lora, qlora=qlora, lora_rank=lora_rank, lora_alpha=2 * lora_rank, fsdp=fsdp,
            num_workers=num_workers,
        )
        with TrainProgress(stage, quiet) as progress:
            result = finetune(cfg, on_log=progress.show, on_start=lambda plan: progress.note(f"omni: {plan.describe()}"))
    except OmniError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was written.", code=130)
    if quiet:
        raise typer.Exit(130 if result.interrupted else 0)
    resume_hint = f"resume with --resume {result.last_checkpoint}" if result.last_checkpoint else "nothing to resume from: start again"
    if result.unsaved:
        last = f"the last checkpoint is {result.last_checkpoint}: {resume_hint}" if result.last_checkpoint else resume_hint
        fail(f"stopped at once by a second Ctrl-C: {result.unsaved} was not saved; {last}.", code=130)
    if result.interrupted:
        typer.echo(f"interrupted at step {result.steps}; {resume_hint}", err=True)
        raise typer.Exit(130)
    typer.echo(f"fine-tuned model: {result.output_dir} (load it with --model {result.output_dir})")


@app.command("units")
def units_cmd(
    source: Annotated[Path, typer.Argument(help="A directory of response WAVs, or a manifest whose records name their response speech (tgt_speech).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the labelled JSONL (or JSON, for a JSON manifest).")],
    hubert: Annotated[Path, typer.Option("--hubert", help="mHuBERT as a transformers directory (config.json + safetensors): `omni convert-hubert` or `omni download --units` makes it.")],
    kmeans: Annotated[Path, typer.Option("--kmeans", help="k-means centres as safetensors or .npy (convert the released pickle once with `omni convert-kmeans`).")],
    layer: Annotated[int, typer.Option("--layer", min=1, help="HuBERT layer whose features are clustered (reference: 11).")] = 11,
    device: DeviceOpt = None,
) -> None:
    """Make stage-2 unit targets from response speech: HuBERT layer features → nearest k-means centre, repeats merged."""
    from omni_cli.train.units import UnitExtractor, label_units, load_kmeans_centres

    try:
        extractor = UnitExtractor(hubert, load_kmeans_centres(kmeans), layer=layer, device=device)
        count = label_units(source, out, extractor, on_item=lambda i, n, path: typer.echo(f"[{i}/{n}] {path}", err=True))
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote units for {count} items to {out}")


@app.command("convert-kmeans")
def convert_kmeans_cmd(
    src: Annotated[Path, typer.Argument(help="The released k-means file (scikit-learn MiniBatchKMeans saved by joblib or pickle, e.g. mhubert_base_vp_en_es_fr_it3_L11_km1000.bin).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the centres (safetensors).")],
) -> None:
    """Convert the released k-means file ONCE into safetensors holding only its centres.

    The file is read by a restricted unpickler that builds nothing but numpy arrays and a stand-in for scikit-learn's MiniBatchKMeans (no scikit-learn needed); a file naming any other class or function is refused, so it cannot run code.

    Example:\n
      omni convert-kmeans mhubert_base_vp_en_es_fr_it3_L11_km1000.bin km1000.safetensors
    """
    from omni_cli.train.units import convert_kmeans

    try:
        convert_kmeans(src, dst)
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote {dst}; pass it as --kmeans")


@app.command("convert-hubert")
def convert_hubert_cmd(
    src: Annotated[Path, typer.Argument(help="The fairseq HuBERT checkpoint, e.g. mhubert_base_vp_en_es_fr_it3.pt.")],
    dst: Annotated[Path, typer.Argument(help="New directory for the transformers HubertModel (config.json + model.safetensors).")],
) -> None:
    """Convert a fairseq HuBERT checkpoint ONCE into a transformers HubertModel directory for `omni units --hubert`.

    Read with torch.load(weights_only=True); the config objects such checkpoints hold (argparse.Namespace, omegaconf and fairseq config classes) are read as inert data, anything else is refused. No fairseq needed.

    Example:\n
      omni convert-hubert mhubert_base_vp_en_es_fr_it3.pt ./mhubert-hf
    """
    from omni_cli.train.hubert import convert_hubert

    try:
        convert_hubert(src, dst)
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote {dst}; pass it as --hubert")


def main() -> None:
    """Entry point of the `omni` command and `python -m omni_cli.cli`.

    After `omni chat` the process ends with os._exit once stdout and stderr are flushed: every
    file of the session is closed by then, and the interpreter's teardown (torch's modules, the
    audio libraries' exit handlers) took 4-7 s after "session saved". Only here, never inside
    `app` (tests run it in-process with CliRunner).
    """
    try:
        app()
    except SystemExit as exc:
        if not _exit_fast:
            raise
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
