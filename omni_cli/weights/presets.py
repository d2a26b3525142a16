"""Model presets: which weights make up a model, and where those weights are on this machine.

A preset (`omni_cli/preset_files/NAME.toml`, the same file as `models/NAME.toml`) names the
LLaMA-Omni checkpoint and the Whisper encoder on the Hugging Face hub and the unit vocoder
by URL, and optionally the mHuBERT + k-means files `omni units` needs for training data.
`resolve_preset` turns a preset name (or a checkpoint directory) into local paths without
touching the network; parts not on disk yet are listed in `ResolvedModel.missing`.

A preset is data from a file the user may have edited or downloaded, so it is checked before
anything uses it: file and folder names are plain names (never `../x`), URLs are HTTPS, and
repository ids look like `org/name`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omni_cli.errors import ConfigError, one_line
from omni_cli.weights.layout import CONFIG_NAME, SAFETENSORS_INDEX_NAME, VOCODER_SAFETENSORS_NAME, index_shard_names
from omni_cli.weights.preset_values import GB, config_table, count, gigabytes, strings, table, typed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESET_SUFFIX = ".toml"
# Package data folder holding the shipped presets (not "presets/": that name is this module).
PRESET_FOLDER = "preset_files"
# Where `--local-dir` puts the vocoder and the unit-extraction files; hub parts go to their repo's name.
VOCODER_DIRNAME = "vocoder"
UNITS_DIRNAME = "units"
# What `omni download --units` converts the released mHuBERT and k-means files into (read by `omni units`).
HUBERT_DIRNAME = "hubert"
KMEANS_CENTRES_NAME = "kmeans.safetensors"
# Hosts that may serve preset files over plain HTTP: none. Tests add their 127.0.0.1 server.
PLAIN_HTTP_HOSTS: frozenset[str] = frozenset()
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubPart:
    """A part fetched from the Hugging Face hub with huggingface_hub (its cache, resumable)."""

    key: str  # "model" or "speech_encoder"
    repo_id: str
    revision: str  # a commit hash (pinned) or a branch such as "main" (whatever it points to today)
    allow_patterns: tuple[str, ...]
    required_files: tuple[str, ...]
    approx_size_bytes: int
    licence: str
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def dirname(self) -> str:
        """Folder name under --local-dir: the repository's name (e.g. whisper-large-v3)."""
        return self.repo_id.split("/")[-1]

    @property
    def pinned(self) -> bool:
        """True when `revision` is a commit hash, so every download gets the same files."""
        return _COMMIT.fullmatch(self.revision) is not None


@dataclass(frozen=True)
class RemoteFile:
    """One file fetched by plain HTTP; size and sha256 are None where not pinned yet."""

    name: str
    url: str
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class VocoderPart:
    """The unit vocoder: files by URL, converted once to safetensors after download."""

    name: str
    checkpoint: str  # the pickled file among `files`, converted to vocoder.safetensors
    files: tuple[RemoteFile, ...]
    approx_size_bytes: int
    licence: str
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    key: str = "vocoder"


@dataclass(frozen=True)
class UnitsPart:
    """What `omni units` needs (optional, for stage-2 training data): mHuBERT and its k-means, by URL.

    After download the fairseq checkpoint is converted to a transformers HuBERT directory and the
    k-means pickle to safetensors centres, both read without running code from the files.
    """

    name: str
    hubert_checkpoint: str  # the fairseq checkpoint among `files`
    kmeans: str  # the scikit-learn k-means pickle among `files`
    layer: int  # the HuBERT layer the k-means was trained on
    files: tuple[RemoteFile, ...]
    approx_size_bytes: int
    licence: str
    key: str = "units"


@dataclass(frozen=True)
class Preset:
    """A named model: its three parts, default chunk size and licence note (and the optional units part)."""

    name: str
    description: str
    chunk_units: int
    licence: str
    model: HubPart
    speech_encoder: HubPart
    vocoder: VocoderPart
    source: Path
    units: UnitsPart | None = None

    @property
    def parts(self) -> tuple[HubPart | VocoderPart, ...]:
        """The parts a reply needs, in download order (the units part is not one of them)."""
        return (self.model, self.speech_encoder, self.vocoder)

    @property
    def command_name(self) -> str:
        """How to name this preset on a command line: its name if shipped, else its file."""
        shipped = find_preset(self.name)
        return self.name if shipped is not None and shipped.source == self.source else str(self.source)

    def part(self, key: str) -> HubPart | VocoderPart | UnitsPart:
        """The part called `key` ("model", "speech_encoder", "vocoder" or "units")."""
        for p in (*self.parts, self.units):
            if p is not None and p.key == key:
                return p
        raise KeyError(key)


@dataclass(frozen=True)
class ResolvedModel:
    """Local paths of a model's parts; `missing` names the preset parts not on disk yet."""

    model_dir: Path | None
    speech_encoder: Path | None
    vocoder_dir: Path | None
    chunk_units: int | None
    preset: Preset | None = None
    local_dir: Path | None = None
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every part is on disk."""
        return not self.missing

    def missing_bytes(self) -> int:
        """Approximate download size of the missing parts."""
        if self.preset is None:
            return 0
        return sum(self.preset.part(k).approx_size_bytes for k in self.missing)


# ---------------------------------------------------------------------------------------------
# Reading presets


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    folder = resources.files("omni_cli") / PRESET_FOLDER
    return sorted(p.name[: -len(PRESET_SUFFIX)] for p in folder.iterdir() if p.name.endswith(PRESET_SUFFIX))


def plain_name(name: str, where: str) -> str:
    """`name` if it is a plain file or folder name; a path (`../x`, `a/b`, `/x`) or a hidden name is refused.

    Preset names become paths under the download folder, so none may lead out of it.
    """
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") or ":" in name:
        raise ConfigError(f"preset {where}: {name!r} is not a plain file name (no folders, no leading dot); fix the preset.")
    return name


def check_url(url: str, where: str) -> str:
    """`url` if it is HTTPS (plain HTTP only for PLAIN_HTTP_HOSTS, which tests set); anything else is refused."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in PLAIN_HTTP_HOSTS:
        return url
    raise ConfigError(f"{where}: {url!r} is not an https:// URL; omni downloads weights over HTTPS only.")


def _hub_part(raw: dict[str, Any], key: str, source: str) -> HubPart:
    t = table(raw, key, source)
    where = f"{source} [{key}]"
    repo_id = typed(t, "repo_id", str, where)
    if not _REPO_ID.fullmatch(repo_id) or repo_id.split("/")[-1] in (".", ".."):
        raise ConfigError(f"preset {where}: repo_id {repo_id!r} is not a hub repository id like 'org/name'.")
    return HubPart(
        key=key,
        repo_id=repo_id,
        revision=str(t.get("revision", "main")),
        allow_patterns=strings(t, "allow_patterns", where),
        required_files=strings(t, "required_files", where, [CONFIG_NAME]),
        approx_size_bytes=gigabytes(t, where),
        licence=str(t.get("licence", "")),
        config=config_table(t, where),
    )


def read_remote_files(t: dict[str, Any], where: str) -> tuple[RemoteFile, ...]:
    """The `[[files]]` entries of a preset table (a model part, or a voice preset): plain names, HTTPS URLs,
    size and SHA-256 where pinned; a malformed entry is a ConfigError naming `where`."""
    files = []
    for entry in typed(t, "files", list, where):
        if not isinstance(entry, dict):
            raise ConfigError(f"preset {where}: each files entry must be a table with name and url.")
        sha256 = str(entry.get("sha256") or "").lower() or None  # "": not pinned
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ConfigError(f"preset {where}: sha256 {sha256!r} is not 64 hex digits.")
        files.append(
            RemoteFile(
                name=plain_name(typed(entry, "name", str, where), where),
                url=check_url(typed(entry, "url", str, where), f"preset {where}"),
                size=count(entry, "size", where, optional=True),  # absent or 0: not pinned
                sha256=sha256,
            )
        )
    return tuple(files)


def _one_of(t: dict[str, Any], key: str, files: tuple[RemoteFile, ...], where: str) -> str:
    name = typed(t, key, str, where)
    if name not in {f.name for f in files}:
        raise ConfigError(f"preset {where}: {key} {name!r} is not one of its files.")
    return name


def _vocoder_part(raw: dict[str, Any], source: str) -> VocoderPart:
    t = table(raw, "vocoder", source)
    where = f"{source} [vocoder]"
    files = read_remote_files(t, where)
    return VocoderPart(
        name=plain_name(typed(t, "name", str, where), where),
        checkpoint=_one_of(t, "checkpoint", files, where),
        files=files,
        approx_size_bytes=gigabytes(t, where),
        licence=str(t.get("licence", "")),
        config=config_table(t, where),
    )


def _units_part(raw: dict[str, Any], source: str) -> UnitsPart | None:
    if "units" not in raw:
        return None
    t = table(raw, "units", source)
    where = f"{source} [units]"
    files = read_remote_files(t, where)
    return UnitsPart(
        name=plain_name(typed(t, "name", str, where), where),
        hubert_checkpoint=_one_of(t, "hubert_checkpoint", files, where),
        kmeans=_one_of(t, "kmeans", files, where),
        layer=count(t, "layer", where),
        files=files,
        approx_size_bytes=gigabytes(t, where),
        licence=str(t.get("licence", "")),
    )


def _model_config(part: HubPart, source: str) -> HubPart:
    """The model's config table must carry the adaptor width, which config.json lacks (the GPU-fit estimate needs it)."""
    width = part.config.get("speech_adaptor_hidden")
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ConfigError(
            f"preset {source} [model.config] lacks speech_adaptor_hidden (the adaptor's inner width, 2048 for "
            "LLaMA-Omni; config.json does not store it); add it as in models/llama-omni-8b.toml."
        )
    return part


def load_preset(path: str | Path) -> Preset:
    """Read and validate one preset TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read preset {path} ({exc}).") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"preset {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8.") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"preset {path} is not valid TOML ({one_line(exc)}).") from exc
    source = path.name
    return Preset(
        name=typed(raw, "name", str, source),
        description=str(raw.get("description", "")),
        chunk_units=count(raw, "chunk_units", source),
        licence=str(raw.get("licence", "")),
        model=_model_config(_hub_part(raw, "model", source), source),
        speech_encoder=_hub_part(raw, "speech_encoder", source),
        vocoder=_vocoder_part(raw, source),
        source=path,
        units=_units_part(raw, source),
    )


def find_preset(name_or_path: str) -> Preset | None:
    """The preset a name ("llama-omni-8b") or a .toml path names, or None if it names none."""
    if name_or_path.endswith(PRESET_SUFFIX) and Path(name_or_path).is_file():
        return load_preset(Path(name_or_path))
    if "/" in name_or_path or os.sep in name_or_path:
        return None
    candidate = resources.files("omni_cli") / PRESET_FOLDER / f"{name_or_path}{PRESET_SUFFIX}"
    if not candidate.is_file():
        return None
    with resources.as_file(candidate) as path:
        return load_preset(path)


def get_preset(name_or_path: str) -> Preset:
    """Like find_preset, but an unknown name is a one-line error listing the presets."""
    preset = find_preset(name_or_path)
    if preset is None:
        raise ConfigError(f"no preset named {name_or_path!r}; presets: {', '.join(preset_names())} (see models/README.md).")
    return preset


# ---------------------------------------------------------------------------------------------
# Where parts live on disk


def omni_cache_dir() -> Path:
    """omni's own cache (the vocoder; hub parts live in huggingface_hub's cache): $OMNI_CACHE or ~/.cache/omni."""
    if os.environ.get("OMNI_CACHE"):
        return Path(os.environ["OMNI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "omni"


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read now (so $HF_HUB_CACHE set after import still counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (read now) forbids huggingface_hub to use the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def vocoder_dir(preset: Preset, local_dir: Path | None = None) -> Path:
    """Where the preset's vocoder is (or will be) kept."""
    if local_dir is not None:
        return Path(local_dir) / VOCODER_DIRNAME
    return omni_cache_dir() / "vocoders" / preset.vocoder.name


def units_dir(part: UnitsPart, local_dir: Path | None = None) -> Path:
    """Where the preset's mHuBERT and k-means files are (or will be) kept, with their conversions."""
    if local_dir is not None:
        return Path(local_dir) / UNITS_DIRNAME
    return omni_cache_dir() / "units" / part.name


def units_present(directory: Path) -> bool:
    """True when the converted HuBERT directory and k-means centres `omni units` reads are in `directory`."""
    return (directory / HUBERT_DIRNAME / CONFIG_NAME).is_file() and (directory / KMEANS_CENTRES_NAME).is_file()


def missing_hub_files(directory: Path, part: HubPart) -> list[str]:
    """Required files of a hub part absent from `directory` (shards named by an index included)."""
    missing = [name for name in part.required_files if not (directory / name).is_file()]
    if any(p.endswith(".safetensors") for p in part.allow_patterns):
        index = directory / SAFETENSORS_INDEX_NAME
        if index.is_file():
            try:
                shards = index_shard_names(index)
            except ValueError:
                shards = []  # a broken index is reported by the loader / `omni doctor`
            missing += [s for s in shards if not (directory / s).is_file()]
        elif not any(directory.glob("*.safetensors")):
            missing.append("*.safetensors")
    return missing


def hub_snapshot(part: HubPart, cache_dir: Path | None = None, **options: Any) -> Path:
    """huggingface_hub's snapshot of a hub part at the preset's revision and file patterns;
    `options` go to `snapshot_download` (local_dir, local_files_only)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        part.repo_id,
        revision=part.revision,
        allow_patterns=list(part.allow_patterns),
        cache_dir=str(cache_dir or hub_cache_dir()),
        **options,
    )
    return Path(folder)


def locate_hub_part(part: HubPart, local_dir: Path | None = None, cache_dir: Path | None = None) -> Path | None:
    """The folder holding a complete copy of a hub part, or None; never uses the network.

    With `local_dir`, looks in `local_dir/<repo name>`; otherwise asks huggingface_hub for
    the cached snapshot of the preset's revision (`local_files_only`).
    """
    if local_dir is not None:
        folder = Path(local_dir) / part.dirname
    else:
        from huggingface_hub import errors as hub_errors

        incomplete = getattr(hub_errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2: the snapshot misses a file
        try:
            folder = hub_snapshot(part, cache_dir, local_files_only=True)
        except incomplete as exc:
            # The snapshot lacks a file the patterns match (e.g. one a later preset added): still usable
            # when every required file is there (checked below); `omni download` fetches the rest.
            folder = Path(exc.snapshot_path)
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, ...: "not cached"
            return None
    if not folder.is_dir() or missing_hub_files(folder, part):
        return None
    return folder


def vocoder_present(directory: Path, part: VocoderPart) -> bool:
    """True when the vocoder's config and weights (converted or released) are in `directory`."""
    has_weights = (directory / VOCODER_SAFETENSORS_NAME).is_file() or (directory / part.checkpoint).is_file()
    return (directory / CONFIG_NAME).is_file() and has_weights


def resolve_preset(
    name_or_path: str | Path, local_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> ResolvedModel:
    """Local paths for `--model`: a checkpoint directory as it is, or a preset's parts.

    Never touches the network. Preset parts not on disk are named in `missing` (their paths
    are None); `omni_cli.setup.download.download_preset` fetches them.
    """
    text = str(name_or_path)
    local = Path(local_dir).expanduser() if local_dir is not None else None
    if Path(text).expanduser().is_dir():
        return ResolvedModel(Path(text).expanduser(), None, None, None)
    preset = find_preset(text)
    if preset is None:
        raise ConfigError(
            f"--model {text} is neither a checkpoint directory nor a preset; presets: {', '.join(preset_names())}."
        )
    cache = Path(cache_dir) if cache_dir is not None else None
    model_dir = locate_hub_part(preset.model, local, cache)
    encoder_dir = locate_hub_part(preset.speech_encoder, local, cache)
    voc_dir = vocoder_dir(preset, local)
    voc_found = voc_dir if vocoder_present(voc_dir, preset.vocoder) else None
    missing = tuple(
        key
        for key, found in (("model", model_dir), ("speech_encoder", encoder_dir), ("vocoder", voc_found))
        if found is None
    )
    return ResolvedModel(model_dir, encoder_dir, voc_found, preset.chunk_units, preset, local, missing)


def looks_like_preset(name_or_path: str | Path) -> bool:
    """True when `--model` names a preset rather than a directory (used before anything loads).

    A .toml file counts without being read: a malformed one is reported, in one line, where it is loaded.
    """
    text = str(name_or_path)
    if text.endswith(PRESET_SUFFIX) and Path(text).is_file():
        return True
    return not Path(text).expanduser().is_dir() and find_preset(text) is not None


__all__ = [
    "GB", "HubPart", "RemoteFile", "VocoderPart", "UnitsPart", "Preset", "ResolvedModel", "preset_names", "load_preset",
    "find_preset", "get_preset", "omni_cache_dir", "hub_cache_dir", "hub_offline", "vocoder_dir", "units_dir",
    "units_present", "plain_name", "check_url", "read_remote_files", "missing_hub_files", "locate_hub_part", "vocoder_present",
    "resolve_preset", "looks_like_preset",
]
