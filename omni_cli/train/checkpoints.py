"""Fine-tuning checkpoints on disk: atomic directory saves, the trainer state, RNG state, resume and pruning.

A checkpoint is a directory in the released layout (config.json, tokenizer, safetensors
shards) plus `trainer_state.pt` (optimizer, scheduler, step, RNG), which loads with
`torch.load(weights_only=True)`. Every directory is written under a temporary name and
renamed into place, so an interrupted save never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_cli.errors import CheckpointError
from omni_cli.weights.layout import SAFETENSORS_INDEX_NAME, fsync_file, write_shards

TRAINER_STATE_FILE = "trainer_state.pt"
# Files of the source checkpoint copied verbatim next to the new weights.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "final"


def replace_directory(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` onto `final`; an old `final` is removed only after the new one is in place."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    source_dir: Path,
    out_dir: Path,
    trainer_state: dict[str, Any] | None,
    speech_encoder: Path | None = None,
) -> Path:
    """Write `tensors` as a checkpoint directory in the released layout (+ trainer state), atomically.

    config.json is copied unchanged except `speech_encoder`, which is set to the encoder the
    run used (absolute path) when one was given, so `--model DIR` alone finds it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, tmp / name)
    if speech_encoder is not None and (tmp / "config.json").is_file():
        raw = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        raw["speech_encoder"] = str(Path(speech_encoder).resolve())
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_shards(tensors, tmp, durable=True)
    if trainer_state is not None:
        with (tmp / TRAINER_STATE_FILE).open("wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
    # Copied files too: everything in the folder is on disk before the folder gets its name.
    for written in tmp.iterdir():
        if written.suffix != ".safetensors" and written.name not in (SAFETENSORS_INDEX_NAME, TRAINER_STATE_FILE):
            fsync_file(written)
    replace_directory(tmp, out_dir)
    return out_dir


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (data order, dropout) for a reproducible run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, loaded safely (tensors and plain types only)."""
    path = checkpoint / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAINER_STATE_FILE}; --resume needs a checkpoint written by omni finetune.")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at, read from its trainer state (memory-mapped: no full read)."""
    state = torch.load(checkpoint / TRAINER_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    return int(state["step"])


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the checkpoint under it (`final/` or `checkpoint-N`) with the most steps.

    The step comes from each trainer state, not the folder name: after resuming a finished run
    with more steps, a newer `checkpoint-N` is ahead of the old `final/`.
    """
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    found = [p for p in [path / FINAL_DIR, *path.glob(f"{CHECKPOINT_PREFIX}*")] if (p / TRAINER_STATE_FILE).is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint to resume under {path}; pass --resume a {CHECKPOINT_PREFIX}N directory.")
    # On equal steps `final/` wins (it is the finished model).
    return max(found, key=lambda p: (checkpoint_step(p), p.name == FINAL_DIR))


class CheckpointList:
    """The `checkpoint-N` folders this run wrote, newest last; keeps at most `keep` of them (0: all)."""

    def __init__(self, output: Path, keep: int) -> None:
        self.output = Path(output)
        self.keep = keep
        self.saved: list[Path] = []

    def path(self, step: int) -> Path:
        """Where the checkpoint of `step` goes."""
        return self.output / f"{CHECKPOINT_PREFIX}{step}"

    def is_latest(self, path: Path) -> bool:
        """Whether `path` is the checkpoint written last (Ctrl-C right after a periodic save)."""
        return bool(self.saved) and self.saved[-1] == path

    def add(self, path: Path, delete: bool) -> None:
        """Record a new checkpoint and forget the oldest beyond `keep` (deleting them when `delete`: rank 0)."""
        self.saved.append(path)
        if self.keep > 0:
            for old in self.saved[: -self.keep]:  # never the newest: keep >= 1
                if delete:
                    shutil.rmtree(old, ignore_errors=True)
                self.saved.remove(old)
