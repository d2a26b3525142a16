"""Replies generated on a thread of their own, so the conversation's thread never stops listening.

The pipeline is a generator: pulled on the conversation's thread, every model step held up the
microphone. A vocoder chunk takes ~100 ms on a CPU (three microphone frames), so a user who went
on after a pause was heard up to 90 ms late, and the reply they talked over played on meanwhile.
Now one `ModelThread` per conversation pulls each reply's events into a queue (`Generation`), and
the conversation takes them as they come, between microphone frames.

Replies run on the model thread one after another, never two at once (one set of caches);
`Generation.close()` returns at once and the reply stops at its next step. One thread for all of
a conversation's replies, not one each: compiled CUDA graphs are kept per thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from omni_cli.pipeline import Event

StartReply = Callable[[Callable[[], bool]], Iterator[Event]]
"""Starts a reply given its should_stop(): e.g. `lambda stop: pipeline.respond(audio, history, stop)`."""

_END = object()  # the reply's events are over


class _Raised:
    """The model failed: the conversation's thread raises it where a reply's errors are handled."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Generation:
    """One reply's events as the model thread makes them; read by the conversation's thread."""

    def __init__(self, start: StartReply, should_stop: Callable[[], bool]) -> None:
        self._start = start
        self._should_stop = should_stop
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closing = False
        self.finished = False  # its last event was taken (or it failed)

    def get(self, timeout: float) -> Event | None:
        """The next event, waiting up to `timeout` seconds; None when none came (or all were taken).

        Raises the model's exception once, after the events made before it."""
        if self.finished:
            return None
        try:
            item = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return None
        if item is _END:
            self.finished = True
            return None
        if isinstance(item, _Raised):
            self.finished = True
            raise item.error
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop generating at the next step; what was made and not taken is dropped. Any thread."""
        self._closing = True

    def _stop(self) -> bool:
        return self._closing or self._should_stop()

    def produce(self) -> None:
        """Run the reply to its end (or its close), queueing its events; on the model thread."""
        events: Iterator[Event] | None = None
        try:
            if not self._closing:
                events = self._start(self._stop)
                for event in events:
                    self._events.put(event)
                    if self._closing:
                        break
        except BaseException as exc:  # noqa: BLE001 - raised on the conversation's thread, which handles model faults
            # Even a KeyboardInterrupt: the thread must live on for the next reply, and whoever
            # raised it meant the conversation (a front door's Ctrl-C handler inside generation).
            self._events.put(_Raised(exc))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # a generator stopped early frees its caches now
            self._events.put(_END)


class ModelThread:
    """The thread one conversation's replies are generated on, one at a time, in order."""

    def __init__(self, name: str = "omni-model") -> None:
        self._name = name
        self._waiting: queue.SimpleQueue[Generation] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._pending = 0  # replies queued or running

    def start(self, start: StartReply, should_stop: Callable[[], bool]) -> Generation:
        """Queue a reply: it begins once the one before it has stopped."""
        generation = Generation(start, should_stop)
        with self._lock:
            self._pending += 1
            self._waiting.put(generation)
            if self._thread is None:
                # A daemon: a reply is always stopped before the conversation ends, and an idle
                # thread must not keep the process alive.
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        return generation

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the replies queued to end (closed ones stop at their next
        step); True when none is left. Before the process exits, so no model step is cut mid-way."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            generation = self._waiting.get()
            try:
                generation.produce()
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()
