"""Input audio that does not come from a microphone: frames a client sends, and the buffer of a client-committed turn.

`FrameQueue` is a FrameSource fed from any thread (a network connection, a test): audio of
any length goes in with the time it ended, fixed frames come out on the conversation's thread.
`InputBuffer` holds what was heard since the last commit or clear while turn detection is off.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from omni_cli.audio.vad import FrameSplitter


class FrameQueue:
    """A thread-safe FrameSource: `push()` audio from any thread, `read()` frames on the conversation's.

    Audio is 16 kHz mono (float32 in [-1, 1], or int16) in blocks of any length; it is cut into
    `frame_ms` frames, each stamped with when it ended (`frame_end_t` after read()). At most
    `max_seconds` wait: older frames are dropped (and counted) when a reader falls behind.
    """

    def __init__(self, frame_ms: int = 30, sample_rate: int = 16000, max_seconds: float = 30.0) -> None:
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        self.frame_end_t: float | None = None
        self.dropped = 0
        self._last_end_t: float | None = None  # when the newest sample pushed was heard
        self._splitter = FrameSplitter(self.frame_samples)
        self._frames: deque[tuple[np.ndarray, float]] = deque(maxlen=max(1, int(max_seconds * 1000 // frame_ms)))
        self._ready = threading.Condition()
        self._closed = False

    def push(self, audio: np.ndarray, end_t: float | None = None) -> None:
        """Add audio whose last sample was heard at `end_t` (time.monotonic(); default: now).

        A partial frame at the end waits for the next push.
        """
        end_t = time.monotonic() if end_t is None else end_t
        with self._ready:
            self._last_end_t = end_t
            frames = self._splitter.push(audio)
            # The newest complete frame ends where the samples still waiting begin.
            behind = self._splitter.pending / self.sample_rate
            for k, frame in enumerate(frames):
                later = (len(frames) - 1 - k) * self.frame_samples / self.sample_rate
                if len(self._frames) == self._frames.maxlen:
                    self.dropped += 1
                self._frames.append((frame, end_t - behind - later))
            if frames:
                self._ready.notify_all()

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """The next frame, waiting up to `timeout` seconds (None: until one comes or close()); None if none came."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._frames or self._closed, timeout):
                return None
            if not self._frames:
                return None
            frame, self.frame_end_t = self._frames.popleft()
            return frame

    def flush(self) -> None:
        """The end of a client's turn: a partial frame waiting for more audio is completed with
        silence, so it can be read (stamped with when its last real sample was heard)."""
        with self._ready:
            missing = -self._splitter.pending % self.frame_samples
            if missing and self._last_end_t is not None:
                (frame,) = self._splitter.push(np.zeros(missing, np.float32))
                self._frames.append((frame, self._last_end_t))
                self._ready.notify_all()

    def clear(self) -> int:
        """Drop the frames waiting (and a partial one); how many whole frames were dropped."""
        with self._ready:
            dropped = len(self._frames)
            self._frames.clear()
            self._splitter.reset()
            return dropped

    def close(self) -> None:
        """No more audio: read() stops waiting."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class InputBuffer:
    """The audio of a client-committed turn: frames heard since the last commit or clear."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.end_t: float | None = None  # when the last frame ended (time.monotonic())
        self.end_stream_t = 0.0  # stream time where it ends

    def append(self, frame: np.ndarray, end_t: float, end_stream_t: float) -> None:
        self.frames.append(frame)
        self.end_t, self.end_stream_t = end_t, end_stream_t

    def take(self) -> np.ndarray | None:
        """The audio heard since the last take or clear (None if nothing), and start afresh."""
        frames, self.frames = self.frames, []
        return np.concatenate(frames) if frames else None

    def clear(self) -> None:
        self.frames = []
