"""The loss log: every optimizer step's loss, learning rate, gradient norm and speed, kept in the run's output.

`OUTPUT/train_log.jsonl` holds one JSON object per step. A resume from step S keeps the lines up
to S and appends from S + 1, so each step is in the file once even when a run went past its last
checkpoint before it stopped. `--report-to tensorboard` writes the same numbers as TensorBoard
events to `OUTPUT/tensorboard/` (purging the steps after S on a resume).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class TrainLog:
    """One optimizer step: `step` of `total_steps`, its loss (the global batch's mean per target) and speeds."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float  # the learning rate this step's update used
    grad_norm: float  # before clipping
    samples_per_second: float  # this step's, all processes together
    tokens_per_second: float  # LLM positions (prompt + speech + reply) per second, all processes together
    elapsed: float  # seconds since this run (or resume) started training

    def row(self) -> dict[str, Any]:
        """The line of train_log.jsonl for this step."""
        return {"step": self.step, "epoch": round(self.epoch, 6), "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "samples_per_s": round(self.samples_per_second, 3), "tokens_per_s": round(self.tokens_per_second, 1),
                "elapsed_s": round(self.elapsed, 3)}


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step, all processes together: its loss (the mean per target), gradient norm and size."""

    loss: float
    grad_norm: float
    lr: float
    samples: int
    positions: int  # LLM positions: prompt + speech + reply
    seconds: float


def _logged_step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line torn by a crash
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


def keep_steps_up_to(path: Path, last_step: int) -> None:
    """Drop the lines of steps after `last_step` (and torn ones) from a log, rewriting it atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if (step := _logged_step(line)) is not None and step <= last_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class LossLog:
    """Appends each step to OUTPUT/train_log.jsonl (flushed per line), and to TensorBoard when asked."""

    def __init__(self, output: Path, start_step: int, tensorboard: bool = False) -> None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        self.path = output / LOG_FILE
        keep_steps_up_to(self.path, start_step)
        self._board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=start_step + 1)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, log: TrainLog) -> None:
        """One step, on disk when this returns (flushed; not fsynced: a lost last line is re-logged on resume)."""
        self._file.write(json.dumps(log.row()) + "\n")
        self._file.flush()
        if self._board is not None:
            for name, value in log.row().items():
                if name not in ("step", "elapsed_s"):
                    self._board.add_scalar(f"train/{name}", value, log.step)
            self._board.flush()

    def close(self) -> None:
        """Close the files (idempotent)."""
        self._file.close()
        if self._board is not None:
            self._board.close()
            self._board = None
