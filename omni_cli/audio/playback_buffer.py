"""The jitter buffer between a streaming reply and the speaker: when to start playing.

The reply's audio arrives in chunks of Ω units; played as it comes, the first chunk can run out
before the next is generated, which is heard as a blip and a gap at the start of every reply.
"""

from __future__ import annotations

import numpy as np


class PlaybackBuffer:
    """A reply's jitter buffer: hold its first chunks until they cover the time to the next one.

    The vocoder delivers audio in chunks of Ω units (a smaller first one); played at once, the
    first chunk runs out before the second is ready whenever Ω units take longer to generate
    than the first chunk lasts, and the reply stutters. So playback starts once the audio held
    covers the expected wait for the next chunk: `chunk_units` × the measured time per unit
    (timed between the reply's Units events; the previous replies' figure until this one has
    its own), with a margin. Held chunks are all released at once; later chunks pass through.
    """

    MARGIN = 1.5
    SLACK_S = 0.03
    MIN_UNITS = 4  # units timed in this reply before its own rate is trusted

    def __init__(self, chunk_units: int | None) -> None:
        self.chunk_units = chunk_units
        self.unit_s: float | None = None  # seconds per unit, from earlier replies
        self.start_reply()

    def start_reply(self) -> None:
        """A new reply: nothing held, nothing timed yet."""
        self.held: list[np.ndarray] = []
        self.held_s = 0.0
        self.started = False
        self._first_units_t: float | None = None
        self._last_units_t = 0.0
        self._units_timed = 0

    def on_units(self, t: float, count: int) -> None:
        """`count` units came out at time `t`; timed from the reply's first units (the prefill is not unit time)."""
        if self._first_units_t is None:
            self._first_units_t = t
        else:
            self._units_timed += count
            self._last_units_t = t

    def current_unit_s(self) -> float | None:
        """Seconds per unit: this reply's once it has timed MIN_UNITS, else the earlier replies'."""
        if self._first_units_t is not None and self._units_timed >= self.MIN_UNITS:
            return (self._last_units_t - self._first_units_t) / self._units_timed
        return self.unit_s

    def wait_s(self) -> float:
        """Audio to hold before playing: the expected time to the next chunk, with a margin (0 when unknown)."""
        unit_s = self.current_unit_s()
        if unit_s is None or not self.chunk_units:
            return 0.0
        return self.chunk_units * unit_s * self.MARGIN + self.SLACK_S

    def push(self, audio: np.ndarray, rate: int) -> list[np.ndarray]:
        """A new chunk; returns what to play now (nothing while still holding)."""
        if self.started:
            return [audio]
        self.held.append(audio)
        self.held_s += audio.size / rate
        return self.release() if self.held_s >= self.wait_s() else []

    def release(self) -> list[np.ndarray]:
        """Play from now on: everything held (e.g. at the end of the reply, or when stopping)."""
        self.started = True
        held, self.held = self.held, []
        return held

    def end_reply(self) -> None:
        """Remember this reply's unit rate for the next one's first chunk."""
        unit_s = self.current_unit_s() if self._units_timed >= self.MIN_UNITS else None
        if unit_s is not None:
            self.unit_s = unit_s
