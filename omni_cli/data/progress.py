"""What `omni data build` and `omni eval` show while they work: one rich progress bar on stderr with an ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ItemProgress:
    """A bar over the items (done / total, elapsed, time remaining), fed by `advance` after each item."""

    def __init__(self, what: str = "items") -> None:
        self._progress = Progress(
            TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[current]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self._task = self._progress.add_task(what, total=None, current="")

    def advance(self, item_id: str, done: int, total: int) -> None:
        """After an item (built, reused from an earlier run, or failed)."""
        self._progress.update(self._task, completed=done, total=total, current=item_id[:32])

    def __enter__(self) -> ItemProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
