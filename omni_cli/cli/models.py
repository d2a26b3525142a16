"""`omni download`, `omni doctor` and `omni make-tiny`: getting a model and checking the machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from omni_cli.cli.shared import (
    Precision,
    PrecisionOpt,
    app,
    echo_err,
    fail,
)
from omni_cli.errors import OmniError


@app.command("make-tiny")
def make_tiny_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the tiny model into.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Try omni without a GPU or a download: write a tiny random LLaMA-Omni (checkpoint, Whisper, vocoder) and a
    tiny mHuBERT + k-means for `omni units`, in the released formats; prints the options that use them.

    Its replies are gibberish, but every command runs the real code path on it, fine-tuning included.\n
    Example:\n
      omni make-tiny /tmp/tiny
    """
    from omni_cli.tiny.hubert import make_tiny_units
    from omni_cli.tiny.omni import make_tiny_model

    paths = make_tiny_model(out, seed=seed)
    units = make_tiny_units(Path(out) / "tiny-units", seed=seed)
    typer.echo(f"--model {paths.model_dir} --speech-encoder {paths.speech_encoder} --vocoder {paths.vocoder_dir}")
    typer.echo(f"--hubert {units.hubert_dir} --kmeans {units.kmeans} --layer {units.layer}")


@app.command("download")
def download_cmd(
    preset: Annotated[str, typer.Argument(help="Preset name (see --list) or a preset .toml file.")] = "llama-omni-8b",
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Put the weights here instead of the Hugging Face / omni caches.")] = None,
    units: Annotated[bool, typer.Option("--units", help="Also fetch mHuBERT and its k-means (the preset's units part) and convert them for `omni units`.")] = False,
    units_only: Annotated[bool, typer.Option("--units-only", help="Fetch only mHuBERT and its k-means for `omni units`, none of the model's parts.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets with their download sizes.")] = False,
) -> None:
    """Download a preset's weights (hub parts into the Hugging Face cache, the vocoder converted to safetensors).

    Resumable: run it again after an interruption. Files the preset pins (size, SHA-256) are verified; for the others omni says they were NOT verified and prints what to pin. Afterwards everything runs offline (HF_HUB_OFFLINE=1).

    Examples:\n
      omni download llama-omni-8b\n
      omni download llama-omni-8b --local-dir ./weights\n
      omni download llama-omni-8b --units      # + mHuBERT and k-means for `omni units`\n
      omni download llama-omni-8b --units-only # only mHuBERT and k-means (labelling replies on another machine)
    """
    from omni_cli.setup.download import download_preset, format_gb
    from omni_cli.weights.presets import (
        HUBERT_DIRNAME,
        KMEANS_CENTRES_NAME,
        get_preset,
        preset_names,
        resolve_preset,
        units_dir,
    )

    try:
        if list_presets:
            for name in preset_names():
                p = get_preset(name)
                typer.echo(f"{name}  {format_gb(sum(part.approx_size_bytes for part in p.parts))}  {p.description}")
            return
        chosen = get_preset(preset)
        if not units_only and resolve_preset(chosen.source, local_dir).missing:
            _note_without_cuda(chosen.name, echo_err)
        resolved = download_preset(chosen, local_dir, units=units or units_only, model=not units_only, echo=echo_err)
    except OmniError as exc:
        fail(str(exc), code=1)
    if not units_only:
        if local_dir is None:
            typer.echo(f"{chosen.name} is ready: omni chat --model {chosen.name}")
        else:
            paths = f"--model {resolved.model_dir} --speech-encoder {resolved.speech_encoder} --vocoder {resolved.vocoder_dir}"
            typer.echo(f"{chosen.name} is ready: omni chat {paths}")
    if (units or units_only) and chosen.units is not None:
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


