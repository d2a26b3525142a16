"""What `omni finetune` shows while it trains: a rich progress line on a terminal; plain lines in a log file.

A live bar written to a file keeps only its last state, cut to the console width; when stderr
is not a terminal, one full line every `every` steps (and the last) is printed instead.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from omni_cli.train.train_log import TrainLog


def plain_line(log: TrainLog) -> str:
    """One step as a line for a log file: everything train_log.jsonl holds but the epoch's decimals."""
    minutes, seconds = divmod(int(log.elapsed), 60)
    return (f"step {log.step}/{log.total_steps}  loss {log.loss:.4f}  lr {log.lr:.2e}  grad norm {log.grad_norm:.3g}  "
            f"{log.samples_per_second:.1f} samples/s  {log.tokens_per_second:.0f} tokens/s  epoch {log.epoch:.2f}  "
            f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}")


class TrainProgress:
    """Progress on stderr, fed by the trainer's logs; silent on ranks other than 0 (`quiet`)."""

    def __init__(self, stage: int, quiet: bool = False, every: int = 10, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._quiet = quiet
        self._plain = not self._console.is_terminal
        self._every = every
        self._progress = Progress(
            TextColumn(f"stage {stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self._console, disable=quiet or self._plain,
        )
        self._task = self._progress.add_task("train", total=None, info="validating data and loading the model")

    def note(self, line: str) -> None:
        """Print a line above the bar (the run's plan at the start)."""
        if not self._quiet:
            self._console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line, however narrow

    def show(self, log: TrainLog) -> None:
        """Update the bar after an optimizer step (or, in a log file, print every `every`-th step and the last)."""
        if self._plain:
            if not self._quiet and (log.step % self._every == 0 or log.step == log.total_steps):
                self.note(plain_line(log))
            return
        info = f"loss {log.loss:.4f}  lr {log.lr:.2e}  {log.samples_per_second:.1f} samples/s  epoch {log.epoch:.2f}"
        self._progress.update(self._task, completed=log.step, total=log.total_steps, info=info)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
