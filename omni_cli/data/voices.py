"""Neural TTS voices as presets: which files make up a voice, fetched, cached and verified like the model's weights.

A voice preset (`omni_cli/data/voices/NAME.toml`) names its files by HTTPS URL with size and SHA-256;
`fetch_voice` downloads them with `setup/download.py` (resumable `.part` files, pins verified, a
mismatch deleted) into `~/.cache/omni/voices/NAME/` (`$OMNI_CACHE`), once. `--piper-voice` takes a
preset name, a preset file of your own, or a voice's `.onnx` file already on disk (used as it is).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omni_cli.errors import ConfigError
from omni_cli.weights.presets import RemoteFile, omni_cache_dir, plain_name, read_remote_files

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PIPER_VOICE = "en_US-ljspeech-high"
VOICES_FOLDER = "voices"


@dataclass(frozen=True)
class VoicePreset:
    """A voice: its engine, the model file among its files, and every file to fetch."""

    name: str
    engine: str
    model: str
    files: tuple[RemoteFile, ...]
    description: str
    licence: str
    source: Path


def voice_names() -> list[str]:
    """Names of the voice presets shipped in the package."""
    folder = resources.files("omni_cli.data") / VOICES_FOLDER
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_voice_preset(path: Path) -> VoicePreset:
    """Read and check a voice preset file (plain file names, HTTPS URLs, well-formed pins)."""
    where = str(path)
    try:
        raw: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"voice preset {path} cannot be read ({exc}); compare it with {DEFAULT_PIPER_VOICE}.toml.") from exc
    name, engine, model = (raw.get(k) for k in ("name", "engine", "model"))
    if not all(isinstance(v, str) and v for v in (name, engine, model)):
        raise ConfigError(f"voice preset {where} needs name, engine and model.")
    if engine != "piper":
        raise ConfigError(f"voice preset {where}: engine {engine!r} is not one omni runs (piper).")
    files = read_remote_files(raw, where)
    if model not in {f.name for f in files}:
        raise ConfigError(f"voice preset {where}: model {model!r} is not one of its files.")
    return VoicePreset(
        plain_name(str(name), where), str(engine), str(model), files,
        str(raw.get("description", "")), str(raw.get("licence", "")), Path(path),
    )


def find_voice(name_or_path: str) -> VoicePreset | None:
    """The voice preset a name or `.toml` path stands for; None when it is neither (e.g. an `.onnx` file)."""
    if name_or_path.endswith(".toml"):
        return load_voice_preset(Path(name_or_path).expanduser())
    if name_or_path in voice_names():
        with resources.as_file(resources.files("omni_cli.data") / VOICES_FOLDER / f"{name_or_path}.toml") as path:
            return load_voice_preset(path)
    return None


def voice_dir(preset: VoicePreset) -> Path:
    """Where a voice's files are kept once fetched."""
    return omni_cache_dir() / "voices" / preset.name


def fetch_voice(preset: VoicePreset, echo: Any = print) -> Path:
    """The voice's model file, fetched and verified first if it is not in the cache yet."""
    from omni_cli.setup.download import fetch_files

    folder = voice_dir(preset)
    if not all((folder / f.name).is_file() for f in preset.files):
        echo(f"Fetching the {preset.name} voice ({preset.description}); licence: {preset.licence}")
    fetch_files(preset.files, folder, echo=echo)  # files on disk are checked against their pins, not fetched again
    return folder / preset.model


def piper_model_path(voice: str, echo: Any = print) -> Path:
    """`--piper-voice` → the `.onnx` file to load: a preset's (fetched when missing) or the file given."""
    preset = find_voice(voice)
    if preset is not None:
        return fetch_voice(preset, echo)
    path = Path(voice).expanduser()
    if path.suffix == ".onnx":
        return path
    raise ConfigError(
        f"--piper-voice {voice!r} is neither a voice preset ({', '.join(voice_names())}), a preset .toml, nor a .onnx file."
    )
