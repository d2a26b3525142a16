"""The jitter buffer between a streaming reply and the speaker: when to start playing.

The reply's audio arrives in chunks of Ω units; played as it comes, the first chunk can run out
before the next is generated, which is heard as a blip and a gap at the start of every reply.
"""

from __future__ import annotations

import numpy as np


class PlaybackBuffer:
    """A reply's jitter buffer: hold its first chunks until they cover the wait for the next one.

    The vocoder delivers audio in chunks of Ω (`chunk_units`) units, a smaller first one; played
    at once, the first chunk runs out before the second is ready whenever the units still
    missing take longer to generate than the audio held lasts, and the reply stutters. So
    playback starts once the audio held covers the expected wait for the next chunk: the units
    it still needs × the measured time per unit (timed between the reply's Units events; the
    previous replies' figure until this one has its own), with a margin, at most MAX_WAIT_S.

    Feed it every Units event (`on_units`) and audio chunk (`push`); after each event, `take()`
    gives what to play now: nothing while holding, then everything held, then each new chunk.
    """

    MARGIN = 1.5
    SLACK_S = 0.03
    # Generating slower than real time, no hold avoids every gap; past this much, the wait for
    # the first sound costs more than the gaps it saves.
    MAX_WAIT_S = 1.0
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
        self._pending_units = 0  # units since the last chunk: the next one needs chunk_units
        self._first_units_t: float | None = None
        self._last_units_t = 0.0
        self._units_timed = 0

    def on_units(self, t: float, count: int) -> None:
        """`count` units came out at time `t`; timed from the reply's first units (the prefill is not unit time)."""
        self._pending_units += count
        if self._first_units_t is None:
            self._first_units_t = t
        else:
            self._units_timed += count
            self._last_units_t = t

    def push(self, audio: np.ndarray, rate: int) -> None:
        """A chunk of the reply's audio (made of the units pending so far)."""
        self.held.append(audio)
        self.held_s += audio.size / rate
        self._pending_units = 0

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
        missing = max(0, self.chunk_units - self._pending_units)
        return min(missing * unit_s * self.MARGIN + self.SLACK_S, self.MAX_WAIT_S)

    def would_play(self) -> bool:
        """True when take() would give audio now (nothing is taken)."""
        return self.started or (bool(self.held) and self.held_s >= self.wait_s())

    def take(self) -> list[np.ndarray]:
        """The chunks to play now: none while the held audio is short of wait_s(), else all held."""
        if not self.would_play():
            return []
        return self.release()

    def release(self) -> list[np.ndarray]:
        """Play from now on: everything held (e.g. at the end of the reply)."""
        self.started = True
        held, self.held = self.held, []
        return held

    def end_reply(self) -> None:
        """Remember this reply's unit rate for the next one's first chunk."""
        if self._units_timed >= self.MIN_UNITS:
            self.unit_s = self.current_unit_s()


def faded_in(audio: np.ndarray, rate: int, seconds: float) -> np.ndarray:
    """`audio` with its first `seconds` raised from silence (a half cosine): a reply's soft start."""
    n = min(audio.size, int(rate * seconds))
    if n == 0:
        return audio
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
    out = audio.astype(np.float32, copy=True)
    out[:n] *= ramp.astype(np.float32)
    return out
