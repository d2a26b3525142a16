"""One model, one reply at a time: every reply the server makes goes through the `ModelSlot`.

The pipeline's decoding caches (the LLM's and the speech decoder's static KV caches) are shared,
so two replies must never run at once. Requests and Realtime sessions queue for the model in
the order they asked: a turn that has to wait is told how many replies are ahead of it
(`on_wait`), and waits its turn; beyond `max_waiting` waiting turns a new one is refused with
`ModelBusy` (one line, for people). A waiting turn whose client goes away (its `should_stop`
turns true) leaves the queue at once, and a reply whose client goes away stops at its next
token, freeing the model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from omni_cli.errors import OmniError

if TYPE_CHECKING:
    import numpy as np

    from omni_cli.config import ReplyOptions
    from omni_cli.pipeline import Event, History, HistoryTurn, SpeechToSpeech

WaitNotice = Callable[[int], None]
"""Told, once, how many replies are ahead when a turn has to wait for the model."""


class ModelBusy(OmniError):
    """Too many turns are already waiting for the model."""


class SlotClosed(OmniError):
    """The server is stopping: no new replies."""


class TurnWithdrawn(Exception):
    """The turn's client went away (or cancelled) while it waited for the model."""


def _never() -> bool:
    return False


class ModelSlot:
    """The pipeline, lent to one reply at a time, first come first served."""

    def __init__(self, pipeline: SpeechToSpeech, max_waiting: int = 8, poll_s: float = 0.05) -> None:
        self.pipeline = pipeline
        self.max_waiting = max_waiting
        self.poll_s = poll_s  # how often a waiting turn checks whether its client is still there
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # the head holds the model
        self._closed = False
        self.replies = 0  # replies started, for tests and the ready line

    @property
    def closed(self) -> bool:
        """True once the server is stopping."""
        return self._closed

    @property
    def busy(self) -> bool:
        """True while a reply holds the model."""
        with self._cond:
            return bool(self._queue)

    def waiting(self) -> int:
        """Turns queued behind the one holding the model."""
        with self._cond:
            return max(0, len(self._queue) - 1)

    @contextmanager
    def hold(self, should_stop: Callable[[], bool] = _never, on_wait: WaitNotice | None = None) -> Iterator[SpeechToSpeech]:
        """Wait for the model (in turn), then lend it for the `with` block.

        Raises ModelBusy when `max_waiting` turns already wait, SlotClosed when the server is
        stopping, TurnWithdrawn when `should_stop()` turns true while waiting.
        """
        ticket = object()
        ahead = self._enter(ticket)
        try:
            if ahead and on_wait is not None:
                on_wait(ahead)  # outside the lock: the notice may do I/O
            self._wait_for_head(ticket, should_stop)
            self.replies += 1
            yield self.pipeline
        finally:
            self._leave(ticket)

    def respond(
        self,
        audio: np.ndarray | str,
        history: History | list[HistoryTurn] = (),  # type: ignore[assignment]
        should_stop: Callable[[], bool] | None = None,
        options: ReplyOptions | None = None,
        on_wait: WaitNotice | None = None,
    ) -> Iterator[Event]:
        """`pipeline.respond(...)` once the model is free; it is held until the iterator ends or is closed.

        Nothing waits until the first event is asked for. A reply also stops (at its next token)
        when the server stops.
        """
        stop = should_stop or _never
        with self.hold(stop, on_wait) as pipeline:
            yield from pipeline.respond(audio, history, lambda: self._closed or stop(), options)

    def for_conversation(self, on_wait: WaitNotice | None = None, options: ReplyOptions | None = None) -> SlotPipeline:
        """The pipeline as one conversation sees it: its replies go through this slot, with `options` by default."""
        return SlotPipeline(self, on_wait, options)

    def close(self) -> None:
        """Stop taking turns: waiting ones are refused, the reply in progress stops at its next token."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def check_room(self) -> None:
        """Raise now what `hold` would raise on entering (ModelBusy, SlotClosed), taking no turn.

        For a front door that must refuse before its response starts (a stream's status is sent
        with its first byte); the queue may still fill before `hold`, which checks again.
        """
        with self._cond:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        # Called holding self._cond.
        if self._closed:
            raise SlotClosed("the server is stopping; no new replies.")
        ahead = len(self._queue)
        if ahead > self.max_waiting:
            raise ModelBusy(
                f"the model is busy: one reply is being generated and {ahead - 1} more are waiting "
                f"(at most {self.max_waiting}); try again in a moment."
            )

    def _enter(self, ticket: object) -> int:
        with self._cond:
            self._refuse_if_full()
            ahead = len(self._queue)
            self._queue.append(ticket)
            return ahead

    def _wait_for_head(self, ticket: object, should_stop: Callable[[], bool]) -> None:
        with self._cond:
            while self._queue[0] is not ticket:
                if self._closed:
                    raise SlotClosed("the server is stopping; no new replies.")
                if should_stop():
                    raise TurnWithdrawn()
                self._cond.wait(self.poll_s)

    def _leave(self, ticket: object) -> None:
        with self._cond:
            self._queue.remove(ticket)
            self._cond.notify_all()


class SlotPipeline:
    """A conversation's view of the pipeline (what `chat`'s `Pipeline` protocol asks for), through a ModelSlot.

    `respond()` may block before its first event while other replies hold the model; `on_wait`
    is told how many are ahead. `options` (a session's instructions, token limit, text or speech)
    apply to every reply that does not bring its own; the session may replace them at any time.
    """

    def __init__(self, slot: ModelSlot, on_wait: WaitNotice | None = None, options: ReplyOptions | None = None) -> None:
        self.slot = slot
        self.on_wait = on_wait
        self.options = options

    @property
    def sample_rate(self) -> int | None:
        """The reply audio's rate; None when replies are text only."""
        return self.slot.pipeline.sample_rate

    @property
    def context_budget(self) -> int:
        """Prompt positions for history, question and reply."""
        return self.slot.pipeline.context_budget

    @property
    def chunk_units(self) -> int:
        """Units per audio chunk after the first."""
        return self.slot.pipeline.chunk_units

    def respond(self, audio: Any, history: Any = (), should_stop: Callable[[], bool] | None = None, options: Any = None) -> Iterator[Event]:
        """The pipeline's `respond`, taking its turn for the model."""
        return self.slot.respond(audio, history, should_stop, options or self.options, self.on_wait)
