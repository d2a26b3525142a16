"""`omni doctor`: check this machine for a preset, one line per check, each OK or a fix.

Statuses: OK; WARN (works, but not as well as it could); MISSING (an optional part is
absent — GPU, bitsandbytes, audio, weights — with what to do); FIX (something required is
broken: torch or transformers do not import, a present weight file is corrupt). Only FIX
lines make the exit code non-zero, so a machine without GPU or sound card passes.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omni_cli.config import QUANT_INSTALL
from omni_cli.errors import OmniError, one_line
from omni_cli.weights.presets import (
    Preset,
    RemoteFile,
    ResolvedModel,
    get_preset,
    hub_offline,
    resolve_preset,
    units_dir,
    units_present,
)

OK, WARN, MISSING, FIX = "OK", "WARN", "MISSING", "FIX"
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str
    name: str
    detail: str

    @property
    def line(self) -> str:
        """The printed form: status, what was checked, and what was found or what to do."""
        return f"{self.status:<8} {self.name} — {self.detail}"


def check_python() -> Check:
    """Python version (required)."""
    version = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        return Check(FIX, "python", f"{version} is too old; install Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    return Check(OK, "python", version)


def check_libraries() -> list[Check]:
    """torch and transformers import (required)."""
    checks = []
    for name, fix in (("torch", "pip install torch"), ("transformers", "pip install 'transformers>=5'")):
        try:
            module = __import__(name)
        except Exception as exc:  # noqa: BLE001 - a broken install can raise anything on import
            checks.append(Check(FIX, name, f"does not import ({type(exc).__name__}: {exc}); {fix}"))
        else:
            checks.append(Check(OK, name, str(getattr(module, "__version__", "?"))))
    return checks


def check_gpu(preset: Preset | None, resolved: ResolvedModel | None, precision: str) -> list[Check]:
    """CUDA, GPU name and free memory against what the preset needs at `precision` (optional)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - reported by check_libraries
        return []
    from omni_cli.setup.download import format_gb
    from omni_cli.setup.fit import best_fitting_precision, cuda_memory, estimate_gpu_memory, shown_precision, sizes_for_model

    unsized: list[Check] = []
    try:
        sizes = sizes_for_model(resolved) if resolved is not None else None
    except OmniError as exc:  # a preset whose config tables cannot size the model: say so, check the rest
        sizes, unsized = None, [Check(WARN, "GPU memory", f"cannot estimate: {one_line(exc)}")]
    need = estimate_gpu_memory(sizes, precision) if sizes is not None else None
    shown = shown_precision(precision)
    needs = f"; {preset.name} needs ~{format_gb(need)} at {shown}" if preset and need else ""
    memory = cuda_memory()
    if memory is None:
        build = f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        return [Check(MISSING, "CUDA GPU", f"{build}: only the tiny model runs on CPU; install a CUDA build of torch on a machine with an NVIDIA GPU{needs}"), *unsized]
    name, free, total = memory
    checks = [Check(OK, "CUDA GPU", f"{name}, CUDA {torch.version.cuda}, {format_gb(free)} free of {format_gb(total)}"), *unsized]
    if sizes is not None and need is not None:
        if need <= free:
            checks.append(Check(OK, "GPU memory", f"{preset.name if preset else 'the model'} needs ~{format_gb(need)} at {shown}"))
        else:
            best = best_fitting_precision(sizes, free)
            fix = f"use --precision {best} (~{format_gb(estimate_gpu_memory(sizes, best))})" if best else "free GPU memory or use a larger GPU"
            checks.append(Check(WARN, "GPU memory", f"needs ~{format_gb(need)} at {shown} but {format_gb(free)} is free; {fix}"))
    return checks


def check_bitsandbytes() -> Check:
    """bitsandbytes, needed only for --precision 8bit/4bit (optional)."""
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - missing, or its CUDA library fails to load
        reason = "not installed" if isinstance(exc, ImportError) else f"does not import ({type(exc).__name__})"
        return Check(MISSING, "bitsandbytes", f"{reason}: needed only for --precision 8bit/4bit; {QUANT_INSTALL}")
    import torch

    if not torch.cuda.is_available():
        return Check(WARN, "bitsandbytes", f"{bitsandbytes.__version__} installed, but 8bit/4bit need a CUDA GPU")
    return Check(OK, "bitsandbytes", str(bitsandbytes.__version__))


def check_threads() -> Check:
    """The CPU threads torch gets in chat and transcribe-and-reply (`threads.interactive_threads`)."""
    from omni_cli.threads import interactive_threads

    choice = interactive_threads()
    line = f"chat and transcribe-and-reply give the model {choice.description}"
    if choice.cores > 1 and choice.count >= choice.cores:
        return Check(WARN, "torch threads", f"{line}: none left for audio and the screen, replies may stutter; use --threads {choice.cores - 1}")
    return Check(OK, "torch threads", f"{line}; change with --threads or OMP_NUM_THREADS")


def check_audio(list_devices: Callable[[], list] | None = None, output_latency: Callable[[], float] | None = None) -> list[Check]:
    """PortAudio and input/output devices, needed only by `omni chat` (optional), and the output
    latency the default speaker gives omni's stream (part of every reply's latency)."""
    from omni_cli.errors import AudioInputError

    if list_devices is None:
        from omni_cli.audio.devices import list_devices
    if output_latency is None:
        from omni_cli.audio.player import output_latency
    try:
        devices = list_devices()
    except AudioInputError as exc:
        return [Check(MISSING, "audio", f"{exc} `omni chat` needs it; transcribe-and-reply and chat --text do not")]
    checks = []
    for kind, fix in (("input", "connect a microphone (or use `omni chat --text`)"), ("output", "connect speakers or headphones")):
        usable = [d for d in devices if d.has(kind)]
        default = next((d for d in usable if (d.is_default_input if kind == "input" else d.is_default_output)), None)
        if not usable:
            checks.append(Check(MISSING, f"audio {kind}", f"no {kind} device; {fix}; see `omni devices`"))
        else:
            chosen = default or usable[0]
            checks.append(Check(OK, f"audio {kind}", f"{len(usable)} device(s), default: {chosen.name}"))
    if any(d.has("output") for d in devices):
        checks.append(_check_output_latency(output_latency))
    return checks


# Above this, the speaker alone takes a large share of a reply's latency (omni aims at 60 ms
# from the end-of-turn decision to the first sample heard).
SLOW_OUTPUT_MS = 60


def _check_output_latency(output_latency: Callable[[], float]) -> Check:
    from omni_cli.errors import AudioInputError

    try:
        ms = output_latency() * 1000
    except AudioInputError as exc:
        return Check(WARN, "audio latency", f"the default speaker could not be opened to measure it: {exc}")
    line = f"{ms:.0f} ms from omni's audio to the default speaker (its reported output latency)"
    if ms > SLOW_OUTPUT_MS:
        return Check(WARN, "audio latency", f"{line}: every reply is heard that much later; a wired or USB device is usually faster than Bluetooth")
    return Check(OK, "audio latency", line)


def _safetensors_headers(files: list[Path]) -> None:
    from omni_cli.weights.layout import read_shapes

    read_shapes(files)  # raises CheckpointError naming the unreadable file


def _validate_model(folder: Path) -> None:
    from omni_cli.config import OmniConfig
    from omni_cli.weights.layout import weight_files

    OmniConfig.load(folder)
    _safetensors_headers(weight_files(folder))
    json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def _validate_encoder(folder: Path) -> None:
    from omni_cli.config import read_json
    from omni_cli.errors import ConfigError

    if read_json(folder / "config.json", "Whisper checkpoint").get("model_type") != "whisper":
        raise ConfigError(f"{folder / 'config.json'} is not a Whisper config.")
    _safetensors_headers(sorted(folder.glob("*.safetensors")))


def _check_pinned(folder: Path, files: tuple[RemoteFile, ...]) -> None:
    """Every file present in `folder` whose size or SHA-256 the preset pins has them (unpinned ones cannot be checked)."""
    from omni_cli.errors import CheckpointError
    from omni_cli.setup.download import pin_problem, sha256_of

    for remote in files:
        path = folder / remote.name
        if not path.is_file():
            continue
        problem = pin_problem(path.stat().st_size, sha256_of(path) if remote.sha256 is not None else None, remote)
        if problem:
            raise CheckpointError(f"{remote.name} {problem} (pinned by the preset)")


def _validate_vocoder(folder: Path, preset: Preset) -> None:
    from omni_cli.model.vocoder_loading import load_vocoder

    _check_pinned(folder, preset.vocoder.files)
    load_vocoder(folder)  # every weight read and checked against config.json: a truncated file fails here


def _validate_units(folder: Path, preset: Preset) -> None:
    from omni_cli.train.units import load_hubert, load_kmeans_centres
    from omni_cli.weights.presets import HUBERT_DIRNAME, KMEANS_CENTRES_NAME

    assert preset.units is not None
    _check_pinned(folder, preset.units.files)
    load_hubert(folder / HUBERT_DIRNAME)  # as `omni units` loads it: every weight present, used and of its shape
    load_kmeans_centres(folder / KMEANS_CENTRES_NAME)


def check_weights(preset: Preset, resolved: ResolvedModel) -> list[Check]:
    """Each part present and readable (configs parse, safetensors headers read, the vocoder loads); corrupt files are FIX.

    The optional units part (mHuBERT + k-means for `omni units`) is reported too when the preset names one.
    """
    local = f" --local-dir {resolved.local_dir}" if resolved.local_dir else ""
    command = f"omni download {preset.command_name}{local}"
    found = {"model": resolved.model_dir, "speech_encoder": resolved.speech_encoder, "vocoder": resolved.vocoder_dir}
    validators = {
        "model": _validate_model,
        "speech_encoder": _validate_encoder,
        "vocoder": lambda folder: _validate_vocoder(folder, preset),
        "units": lambda folder: _validate_units(folder, preset),
    }
    parts: list = list(preset.parts)
    if preset.units is not None:
        folder = units_dir(preset.units, resolved.local_dir)
        found["units"] = folder if units_present(folder) else None
        parts.append(preset.units)
    checks = []
    for part in parts:
        label = f"weights: {part.key.replace('_', ' ')}"
        folder = found[part.key]
        if folder is None:
            source = getattr(part, "repo_id", None) or part.name
            if part.key == "units":
                checks.append(Check(MISSING, label, f"{source} not downloaded; only `omni units` needs it: run `{command} --units`"))
            else:
                checks.append(Check(MISSING, label, f"{source} not downloaded; run `{command}`"))
            continue
        try:
            validators[part.key](folder)
        except (OmniError, OSError, ValueError) as exc:
            checks.append(Check(FIX, label, f"{folder} is damaged ({one_line(exc)}); delete it and run `{command}`"))
        else:
            checks.append(Check(OK, label, str(folder)))
    return checks


def check_offline(resolved: ResolvedModel | None) -> Check:
    """HF_HUB_OFFLINE: fine once everything is present; blocks downloads otherwise."""
    if not hub_offline():
        return Check(OK, "HF_HUB_OFFLINE", "not set: missing weights can be downloaded")
    if resolved is not None and not resolved.complete:
        return Check(WARN, "HF_HUB_OFFLINE", "is set and weights are missing: unset it to run `omni download`")
    return Check(OK, "HF_HUB_OFFLINE", "set: runs without network (weights are present)")


def run_checks(
    preset_name: str = "llama-omni-8b",
    precision: str = "auto",
    local_dir: Path | None = None,
    list_devices: Callable[[], list] | None = None,
) -> Iterator[Check]:
    """Every check in report order; yields as it goes so slow ones (imports) show progress."""
    yield check_python()
    libraries = check_libraries()
    yield from libraries
    preset = resolved = None
    try:
        preset = get_preset(preset_name)
        resolved = resolve_preset(preset.source, local_dir)
    except OmniError as exc:
        yield Check(FIX, "preset", str(exc))
    if all(c.status == OK for c in libraries):
        yield from check_gpu(preset, resolved, precision)
        yield check_bitsandbytes()
    yield check_threads()
    yield from check_audio(list_devices)
    if preset is not None and resolved is not None:
        yield from check_weights(preset, resolved)
    yield check_offline(resolved)


def exit_code(checks: list[Check]) -> int:
    """1 when something required is broken (a FIX line), else 0."""
    return 1 if any(c.status == FIX for c in checks) else 0


__all__ = [
    "Check",
    "OK",
    "WARN",
    "MISSING",
    "FIX",
    "run_checks",
    "exit_code",
    "check_python",
    "check_libraries",
    "check_gpu",
    "check_bitsandbytes",
    "check_threads",
    "check_audio",
    "check_weights",
    "check_offline",
]
