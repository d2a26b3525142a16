"""From `--model` to files ready to load: resolve a preset or folder, offer to download what is
missing (after checking the machine could run it), read every config once, check the GPU fit.

Everything up to the GPU-fit check runs without torch, so a wrong `--model` (a typo, a folder
without config.json, a config that is not JSON, a broken preset) is one line within a second;
`check_model_files` does that part alone, for commands with more to check before they load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omni_cli.setup.download import DownloadError, Echo, download_preset, format_gb
from omni_cli.setup.fit import check_before_download, check_device_fits
from omni_cli.weights.model_files import ModelFiles, read_model_files
from omni_cli.weights.presets import ResolvedModel, resolve_preset


def prepare_model(
    name_or_path: str | Path,
    *,
    precision: str = "auto",
    device: str | None = None,
    assume_yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    local_dir: Path | None = None,
    echo: Echo = print,
) -> ResolvedModel:
    """Resolve `--model`; download a preset's missing parts after asking (`confirm`) or with `assume_yes`.

    Before anything is offered, the machine is checked for what the model would need at
    `precision` on `device` (see `fit.check_before_download`): a download that could not run
    here is refused. `confirm` is None when nobody can answer (not a terminal): then a missing
    part is a one-line error naming the command to run.
    """
    resolved = resolve_preset(name_or_path, local_dir)
    if resolved.complete or resolved.preset is None:
        return resolved
    preset = resolved.preset
    what = ", ".join(k.replace("_", " ") for k in resolved.missing)
    size = format_gb(resolved.missing_bytes())
    note = check_before_download(resolved, precision, device, size)
    if note:
        echo(note)
    if not assume_yes:
        command = f"omni download {preset.command_name}" + (f" --local-dir {local_dir}" if local_dir else "")
        if confirm is None:
            raise DownloadError(f"{preset.name} is not downloaded yet ({what}, about {size}); run `{command}` or add --yes.")
        if preset.licence and "model" in resolved.missing:
            echo(f"Licence: {preset.licence}")
        if not confirm(f"{preset.name}: {what} missing. Download about {size}?"):
            raise DownloadError(f"nothing downloaded; run `{command}` when ready.")
    return download_preset(preset, local_dir, echo=echo, show_licence=assume_yes)


def _read(resolved: ResolvedModel, speech_encoder: Path | None, vocoder: Path | None) -> ModelFiles:
    """The files of a complete model; a preset's encoder and vocoder fill `speech_encoder`/`vocoder` when not given."""
    assert resolved.model_dir is not None  # complete models only
    return read_model_files(
        resolved.model_dir, speech_encoder or resolved.speech_encoder, vocoder or resolved.vocoder_dir, resolved.preset
    )


def check_model_files(model: str | Path, speech_encoder: Path | None = None, vocoder: Path | None = None) -> ModelFiles | None:
    """`--model`, `--speech-encoder` and `--vocoder` checked without torch or the network, in a fraction of a second.

    A checkpoint folder, or a preset whose parts are all on disk, is read (`ModelFiles`: configs,
    safetensors headers, the encoder and vocoder found); a preset with parts still to download is
    validated and None returned (`prepare_model_files` offers the download). Raises the one-line
    ConfigError or CheckpointError for anything else.
    """
    resolved = resolve_preset(model)
    return _read(resolved, speech_encoder, vocoder) if resolved.complete else None


def prepare_model_files(
    model: str | Path,
    speech_encoder: Path | None = None,
    vocoder: Path | None = None,
    precision: str = "auto",
    device: str | None = None,
    *,
    files: ModelFiles | None = None,
    assume_yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    echo: Callable[[str], None] = print,
) -> ModelFiles:
    """From `--model` to files ready to load: resolve, download what a preset lacks, read, check the GPU fit.

    A preset's encoder and vocoder fill `speech_encoder`/`vocoder` when those are not given;
    `files`, from `check_model_files`, skips to the fit check. `confirm` asks before a download
    (None: nobody can answer, so a missing part is an error); a download that could not run on
    this machine at `precision`/`device` is refused before it is offered. Only the fit check imports torch.
    """
    if files is None:
        resolved: ResolvedModel = prepare_model(
            model, precision=precision, device=device, assume_yes=assume_yes, confirm=confirm, echo=echo
        )
        files = _read(resolved, speech_encoder, vocoder)
    # A clear "try --precision 8bit" before a CUDA out-of-memory error halfway through loading.
    check_device_fits(files, precision, device)
    return files
