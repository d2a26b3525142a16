"""Reading released weight files safely: torch pickles without running code, sharded safetensors indexes."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from omni_cli.errors import CheckpointError

# How torch's weights-only unpickler names the class a file would have run.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_weights_pickle(path: Path, use_instead: str, not_a_checkpoint: CheckpointError, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.

    A file holding any other Python object is refused with the object named; a file that is
    not a torch pickle at all raises `not_a_checkpoint`. `mmap` leaves tensors on disk until
    read (for files of which only a part is needed).
    """
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


def indexed_shards(index: Path, what: str) -> list[Path]:
    """The shard files a `*.safetensors.index.json` lists, all present, in name order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a readable safetensors index ({exc}); re-download the {what}.") from exc
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{index.parent}: shard {missing[0]}{more} listed in {index.name} is missing; finish downloading the {what}.")
    return files
