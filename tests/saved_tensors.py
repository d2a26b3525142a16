"""Read back what a test's run saved: every tensor in a directory's safetensors shards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files in `directory`, by name (all shards together)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out
