"""What `omni finetune` shows while it trains: one rich progress line with loss, learning rate and speed."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omni_cli.train.trainer import TrainLog


class TrainProgress:
    """A progress bar on stderr, fed by the trainer's logs; silent on ranks other than 0 (`quiet`)."""

    def __init__(self, stage: int, quiet: bool = False) -> None:
        self._progress = Progress(
            TextColumn(f"stage {stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=quiet,
        )
        self._task = self._progress.add_task("train", total=None, info="validating data and loading the model")

    def note(self, line: str) -> None:
        """Print a line above the bar (the run's plan at the start)."""
        self._progress.console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line, however narrow

    def show(self, log: TrainLog) -> None:
        """Update the bar after an optimizer step."""
        info = f"loss {log.loss:.4f}  lr {log.lr:.2e}  {log.samples_per_second:.1f} samples/s  epoch {log.epoch:.2f}"
        self._progress.update(self._task, completed=log.step, total=log.total_steps, info=info)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
