"""The released file layout, in one place: file names, tensor-name prefixes, the safetensors shard
index (read and write), and the safe reader of torch pickles.

Loading, training, the tiny test models and the benchmarks all write and read checkpoints
through these functions, so a checkpoint omni writes is laid out exactly as the release is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omni_cli.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"  # a checkpoint in one file (Whisper's release)
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint (LLaMA-Omni's release)
SHARD_BYTES = 5 * 1024**3  # the release's shard size; small models get one shard
VOCODER_SAFETENSORS_NAME = "vocoder.safetensors"  # our one-time conversion of the vocoder pickle
TOKENIZER_NAME = "tokenizer.json"

# Tensor names of the LLaMA-Omni checkpoint: the Llama weights (`model.*`, `lm_head.*`), the
# adaptor and the speech decoder. Some exports also store the frozen Whisper encoder; it is
# loaded from its own file instead.
ADAPTOR_PREFIX = "model.speech_projector."
DECODER_PREFIX = "speech_generator."
IGNORED_PREFIXES = ("model.speech_encoder.",)

# How torch's weights-only unpickler names the class a file would have run.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")

Shapes = dict[str, tuple[tuple[int, ...], Path]]


def shard_name(index: int, count: int) -> str:
    """`model-0000i-of-0000n.safetensors`, 1-based, as released."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(sizes: Mapping[str, int], shard_bytes: int = SHARD_BYTES, count: int | None = None) -> list[list[str]]:
    """Group tensor names (in the given order) into shards of at most `shard_bytes`, or into `count` equal groups."""
    keys = list(sizes)
    if count is not None:
        per = max(1, -(-len(keys) // count))
        return [keys[i * per : (i + 1) * per] for i in range(count)]
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        if groups[-1] and size + sizes[key] > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += sizes[key]
    return groups


def write_index(out_dir: Path, weight_map: Mapping[str, str], total_size: int, durable: bool = False) -> Path:
    """Write `model.safetensors.index.json` (`durable`: fsynced before returning)."""
    path = Path(out_dir) / SAFETENSORS_INDEX_NAME
    body = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(body, indent=2) + "\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return path


def write_shards(
    tensors: Mapping[str, Any], out_dir: Path, shard_bytes: int = SHARD_BYTES, count: int | None = None, durable: bool = False
) -> list[Path]:
    """Write torch tensors as released: `model-0000i-of-0000n.safetensors` shards plus the index.

    Names are sorted; shards hold at most `shard_bytes` (or there are exactly `count` of them).
    `durable` fsyncs every file, for checkpoints that must survive a power loss after a rename.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in sorted(tensors)}
    groups = plan_shards(sizes, shard_bytes, count)
    weight_map: dict[str, str] = {}
    written = []
    for i, keys in enumerate(groups):
        name = shard_name(i, len(groups))
        save_file({k: tensors[k].contiguous() for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        if durable:
            fsync_file(out_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
        written.append(out_dir / name)
    written.append(write_index(out_dir, weight_map, sum(sizes.values()), durable))
    return written


def fsync_file(path: Path) -> None:
    """Force a written file's data to disk, so a power loss after a rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def index_shard_names(index: Path) -> list[str]:
    """The shard names an index lists, sorted; raises ValueError when the index cannot be read."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(str(exc)) from exc


def indexed_shards(index: Path, what: str) -> list[Path]:
    """The shard files a `*.safetensors.index.json` lists, all present, in name order."""
    try:
        names = index_shard_names(index)
    except ValueError as exc:
        raise CheckpointError(f"{index} is not a readable safetensors index ({exc}); re-download the {what}.") from exc
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{index.parent}: shard {missing[0]}{more} listed in {index.name} is missing; finish downloading the {what}.")
    return files


def weight_files(model_dir: Path, what: str = "checkpoint") -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, or every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX_NAME
    if index.is_file():
        return indexed_shards(index, what)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no .safetensors weights; point --model at a LLaMA-Omni checkpoint directory.")
    return files


def read_shapes(files: Iterable[Path]) -> Shapes:
    """Every tensor name in the files with its shape and file, read from the headers only.

    Read through numpy, not torch: the CLI checks a model folder before torch is imported (a
    wrong --model is one line within a second), and shapes need no tensor library.
    """
    from safetensors import SafetensorError, safe_open

    shapes: Shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                for key in handle.keys():
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), f)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc}); re-download it.") from exc
    return shapes


def load_weights_pickle(path: Path, use_instead: str, not_a_checkpoint: CheckpointError, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.

    A file holding any other Python object is refused with the object named; a file that is
    not a torch pickle at all raises `not_a_checkpoint`. `mmap` leaves tensors on disk until
    read (for files of which only a part is needed).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise CheckpointError(
                f"{path} holds a Python object ({refused.group(1)}) besides tensors; refusing to unpickle it (weights_only): use {use_instead}."
            ) from exc
        raise not_a_checkpoint from exc
    except Exception as exc:  # random bytes raise many types (RuntimeError, EOFError, zip errors, ...)
        raise not_a_checkpoint from exc


def _find_checkpoint(directory: Path) -> Path:
    """The fairseq checkpoint in a directory: the latest g_<steps> file, else the only other non-text file."""
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    g_files = [p for p in files if re.fullmatch(r"g_\d+", p.name)]
    if g_files:
        return max(g_files, key=lambda p: int(p.name[2:]))
    others = sorted(p for p in files if p.suffix.lower() not in (".json", ".md", ".txt"))
    if not others:
        raise CheckpointError(
            f"{directory} holds no vocoder weights (g_00500000 or {VOCODER_SAFETENSORS_NAME}); run `omni download`."
        )
    if len(others) > 1:
        names = ", ".join(p.name for p in others[:3])
        raise CheckpointError(f"{directory} holds several possible vocoder checkpoints ({names}); pass the file itself.")
    return others[0]


def locate_vocoder_files(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights file) for a vocoder directory or a weights file with config.json beside it.

    In a directory the converted vocoder.safetensors wins over the released pickle.
    """
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_NAME
        weights = path / VOCODER_SAFETENSORS_NAME
        if not weights.is_file():
            weights = _find_checkpoint(path)
    elif path.is_file():
        config, weights = path.parent / CONFIG_NAME, path
    else:
        raise CheckpointError(f"vocoder path {path} does not exist; run `omni download` or pass the vocoder directory.")
    if not config.is_file():
        raise ConfigError(f"{config} not found: the vocoder needs its config.json next to the weights.")
    return config, weights
