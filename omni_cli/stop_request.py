"""Ctrl-C as a request to stop at the next safe point, for long work that must keep what it made.

`transcribe-and-reply` stops the reply in progress at its next token (and keeps it as a partial
reply); `omni finetune` stops at the next step boundary (and saves a checkpoint). In both, a
second signal stops at once. Imports no torch.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class StopRequest:
    """While entered: the first of `signals` only sets `requested`; the second raises KeyboardInterrupt;
    any later one, while that unwinds (removing or keeping what was half made), is ignored.

    A signal can land anywhere, e.g. between `optimizer.step()` and the step counter; as a flag it
    is only acted on where the work is consistent. `announce`, when given, is written to stderr at
    the first signal. Handlers exist only in the main thread (signals reach only it); elsewhere
    Ctrl-C stays a KeyboardInterrupt.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,), announce: str | None = None) -> None:
        self.requested = False
        self._signals = signals
        self._announce = announce.encode() if announce else None
        self._quitting = False
        self._holding = False
        self._held_back = False  # a stop-at-once that came inside `held()`, raised when the block is done
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; put back Python's default.
            signal.signal(sig, handler if handler is not None else signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        self._previous.clear()

    def is_requested(self) -> bool:
        """For `SpeechToSpeech.respond(should_stop=...)`."""
        return self.requested

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block that must not be broken half-way (writing a file): a signal that would stop at
        once waits for its end, then raises KeyboardInterrupt; the first one still only asks.

        A KeyboardInterrupt inside a library's callback (soundfile writing through cffi) is
        swallowed there and comes out as some other error, a traceback instead of a stop.
        """
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._held_back:
            self._held_back = False
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._quitting:
            return
        if self.requested:
            self._quitting = True
            if self._holding:
                self._held_back = True
                return
            raise KeyboardInterrupt
        self.requested = True
        if self._announce is not None:  # os.write: safe inside a signal handler, unlike print
            os.write(2, self._announce)
