"""The client's loudspeaker, as the conversation sees it: reply audio sent over the network and played there.

The conversation hands its reply audio to an `AudioSink` and asks it what was heard. For a
Realtime client the audio goes out as `response.output_audio.delta` events (`RealtimeReplies`),
and the client plays it as it arrives; what it played is only known when it says so
(`conversation.item.truncate`, which the conversation takes as exact). Until then a reply
counts as played in real time from its first chunk sent — what every client that plays as it
receives does — so the conversation listens for barge-in for as long as the client is likely
to be playing, and a reply cut short is remembered as far as it had played.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from omni_cli.serve.realtime_replies import RealtimeReplies


class ClientPlayback:
    """An AudioSink that sends each chunk to the client and counts it played in real time from the burst's first chunk."""

    output_latency = 0.0  # the network's and the client's own delay are unknown here: what is sent counts

    def __init__(self, replies: RealtimeReplies, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        """`rate`: the reply audio's sample rate (the pipeline's)."""
        self.replies = replies
        self.rate = rate
        self.clock = clock
        self.first_audio_time: float | None = None
        self._lock = threading.Lock()
        self._samples = 0  # sent in this burst
        self._cut: float | None = None  # heard seconds when stop() was called
        self._open = False  # a burst is being sent (play() since the last finish()/stop())

    def play(self, chunk: np.ndarray) -> None:
        """Send `chunk` to the client now (never blocks: the event goes to the connection's queue)."""
        with self._lock:
            if not self._open:
                self.first_audio_time, self._samples, self._cut, self._open = self.clock(), 0, None, True
            self._samples += chunk.size
        self.replies.reply_audio(chunk, self.rate)

    def finish(self) -> None:
        """The burst is complete: it plays out on the client."""
        with self._lock:
            self._open = False

    def stop(self) -> None:
        """Cut: nothing more is sent; what was heard is what had played by now."""
        with self._lock:
            if self._cut is None:
                self._cut = self._played()
            self._open = False

    def silent_time(self, timeout: float = 0.2) -> float | None:
        """When the client fell silent after stop(): it stops on the speech_started it is sent now."""
        return self.clock()

    def _played(self) -> float:
        if self.first_audio_time is None:
            return 0.0
        return max(0.0, min(self._samples / self.rate, self.clock() - self.first_audio_time))

    @property
    def heard_seconds(self) -> float:
        """Seconds of the burst played by now (or when it was cut)."""
        with self._lock:
            return self._cut if self._cut is not None else self._played()

    @property
    def playing(self) -> bool:
        """True until the burst has had time to play out on the client (or was cut)."""
        with self._lock:
            return self._cut is None and (self._open or self._played() < self._samples / self.rate)
