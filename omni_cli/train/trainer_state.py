"""A `checkpoint-N`'s trainer state on disk: its name, its format, and reading it back safely.

The lowest room of train/: `checkpoints.py` writes the state, and `run_settings.py` reads an old
checkpoint's settings from it. torch is imported only when a state is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omni_cli.errors import CheckpointError
from omni_cli.weights.layout import load_weights_pickle

TRAINER_STATE_FILE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
# Version of what a checkpoint-N holds; 1 (no "format" key) held a complete model instead.
STATE_FORMAT = 2


def _read_state(checkpoint: Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer state, loaded safely (tensors and plain types only); one line for anything else."""
    path = checkpoint / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAINER_STATE_FILE}; --resume needs a checkpoint-N folder written by omni finetune.")
    damaged = CheckpointError(
        f"{path} is not a trainer state written by omni finetune (truncated or damaged?); "
        f"resume from another {CHECKPOINT_PREFIX}N folder, or start again with --model."
    )
    state = load_weights_pickle(path, f"a {CHECKPOINT_PREFIX}N folder written by omni finetune", damaged, mmap=mmap)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise damaged
    return state


def load_trainer_state(checkpoint: Path, mmap: bool = False) -> dict[str, Any]:
    """A `checkpoint-N`'s trainer state, loaded safely and checked to hold what resuming needs.

    `mmap`: map the file instead of reading it (the optimizer state of a full stage 1 is tens of GB),
    for a look at its small entries."""
    state = _read_state(checkpoint, mmap)
    if "format" not in state:
        raise CheckpointError(
            f"{checkpoint} was written by an earlier omni and cannot be resumed, but it is a complete model: "
            f"start a new run from it with --model {checkpoint}."
        )
    wanted = {"stage": int, "optimizer": dict, "scheduler": dict, "rng": dict, "base_model": str, "speech_encoder": str}
    if state["format"] != STATE_FORMAT or any(not isinstance(state.get(k), t) for k, t in wanted.items()):
        raise CheckpointError(f"{checkpoint / TRAINER_STATE_FILE} does not hold a trainer state this omni can resume; start again with --model.")
    return state
