"""Which of a Realtime session's turns wait for `response.create`, and the requests that let them go.

In the Realtime protocol a turn is not always answered when it is committed: a typed user
message, a turn the client commits itself (turn detection off), and a spoken turn when server
VAD's `create_response` is false are answered only when the client sends `response.create`
(with, perhaps, settings of its own: instructions, output modalities, a token limit). The conversation answers every turn it is
given; the session's replies pass through this gate first, so such a turn waits there (before
it asks for the model) until a `response.create` is granted to it. A `response.create` with no
such turn committed or on its way is refused: there is nothing to answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class ResponseGate:
    """Counts the turns waiting for `response.create` and the requests not yet used (thread-safe)."""

    def __init__(self, poll_s: float = 0.05) -> None:
        self.poll_s = poll_s  # how often a waiting turn checks whether it should stop waiting
        self._cond = threading.Condition()
        self._grants: deque[Any] = deque()  # response.create's settings, in order, not yet used
        self._waiting = 0  # turns committed that wait for a response.create
        self._coming = 0  # turns the client asked for (commit, a user message) not yet committed
        self._closed = False

    def expect(self) -> None:
        """The client committed audio or added a user message: a turn that will wait is on its way."""
        with self._cond:
            self._coming += 1

    def committed(self) -> None:
        """A turn that waits for response.create was committed (one expected, or a spoken turn heard)."""
        with self._cond:
            self._coming = max(0, self._coming - 1)
            self._waiting += 1

    def came_to_nothing(self) -> None:
        """An expected turn will not come (nothing was committed): requests made for it lapse."""
        with self._cond:
            self._coming = max(0, self._coming - 1)
            while len(self._grants) > self._waiting + self._coming:
                self._grants.pop()

    def request(self, settings: Any) -> bool:
        """response.create: True when a turn is there (or on its way) to be answered; False when none is."""
        with self._cond:
            if self._waiting + self._coming <= len(self._grants):
                return False
            self._grants.append(settings)
            self._cond.notify_all()
            return True

    def wait(self, should_stop: Callable[[], bool]) -> tuple[bool, Any]:
        """Wait (on the conversation's thread) for a response.create for the turn being answered.

        Returns (True, its settings), or (False, None) when `should_stop()` turned true or the
        gate closed first (the turn is then no longer waiting).
        """
        with self._cond:
            while not self._grants:
                if self._closed or should_stop():
                    self._waiting = max(0, self._waiting - 1)
                    return False, None
                self._cond.wait(self.poll_s)
            self._waiting = max(0, self._waiting - 1)
            return True, self._grants.popleft()

    def close(self) -> None:
        """The session ended: nothing waits any more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
