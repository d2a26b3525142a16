"""A Realtime client's microphone, as the conversation reads a microphone: 16 kHz frames with the time they were heard.

`input_audio_buffer.append` brings base64 PCM16 at 24 kHz in blocks of any length; `ClientAudio`
resamples them without seams to 16 kHz, cuts them into frames of `frame_ms` and queues each
frame with the time its last sample reached the server (`frame_end_t`, time.monotonic()) and its
place in the session's audio (`stream_ms`, what `audio_start_ms`/`audio_end_ms` count). It
satisfies the conversation's `FrameSource` (`read(timeout)`, `frame_end_t`, `clear()`, `flush()`) and is
safe to feed from the event loop while the conversation's thread reads it.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import deque

import numpy as np

from omni_cli.audio.stream_resampler import StreamResampler
from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.audio.vad import FrameSplitter
from omni_cli.serve.wire_audio import PCM16_RATE, BadAudio, decode_base64, pcm16_samples


class BufferFull(BadAudio):
    """More client audio is waiting than the session may hold."""


class ClientAudio:
    """Client-appended audio → timed 16 kHz frames for the conversation (a FrameSource)."""

    def __init__(self, max_buffered_s: float, frame_ms: int = 30, rate_in: int = PCM16_RATE, clock=time.monotonic) -> None:
        self.frame_ms = frame_ms
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self.max_frames = max(1, int(max_buffered_s * 1000 // frame_ms))
        self.clock = clock
        self._frames: queue.Queue[tuple[np.ndarray, float]] = queue.Queue()
        self._resampler = StreamResampler(rate_in, SAMPLE_RATE)
        self._splitter = FrameSplitter(self.frame_samples)
        self._lock = threading.Lock()
        self.frames_in = 0  # frames made since the session began
        self.samples_in = 0  # client samples (24 kHz) received since the session began
        # (frame_end_t, stream_ms) of recent frames, to place a conversation's times in the session's audio.
        self._times: deque[tuple[float, int]] = deque(maxlen=self.max_frames + 1000)
        self.frame_end_t: float | None = None  # of the frame read() returned last
        self._last_append_t: float | None = None

    @property
    def received_ms(self) -> int:
        """Milliseconds of audio the client has appended in this session."""
        return self.samples_in * 1000 // PCM16_RATE

    def append(self, data: object) -> int:
        """One `input_audio_buffer.append`'s base64 audio; returns the frames it completed.

        BadAudio for audio that is not PCM16 base64; BufferFull (nothing kept) when the frames
        not yet read would exceed the limit.
        """
        samples = pcm16_samples(decode_base64(data, "audio"))
        now = self.clock()
        with self._lock:
            incoming = (self._splitter.pending + samples.size * SAMPLE_RATE // PCM16_RATE) // self.frame_samples
            if self._frames.qsize() + incoming > self.max_frames:
                raise BufferFull(
                    f"the input audio buffer is full ({self.max_frames * self.frame_ms / 1000:.0f} s not yet heard); "
                    "send audio in real time, or commit or clear it."
                )
            self.samples_in += samples.size
            self._last_append_t = now
            frames = self._splitter.push(self._resampler.process(samples))
            for frame in frames:
                self.frames_in += 1
                stream_ms = self.frames_in * self.frame_ms
                self._times.append((now, stream_ms))
                self._frames.put((frame, now))
            return len(frames)

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """The next frame, or None when none arrives within `timeout` seconds; sets `frame_end_t`."""
        try:
            frame, heard_t = self._frames.get(timeout=timeout)
        except queue.Empty:
            return None
        self.frame_end_t = heard_t
        return frame

    def flush(self) -> None:
        """The client committed its turn: a partial last frame is completed with silence so the
        turn ends where its audio did (stamped with the last append's time)."""
        with self._lock:
            missing = -self._splitter.pending % self.frame_samples
            if not missing or self._last_append_t is None:
                return
            (frame,) = self._splitter.push(np.zeros(missing, np.float32))
            self.frames_in += 1
            self._times.append((self._last_append_t, self.frames_in * self.frame_ms))
            self._frames.put((frame, self._last_append_t))

    def clear(self) -> int:
        """Drop the frames not yet read (`input_audio_buffer.clear`); returns how many."""
        dropped = 0
        with self._lock:
            while True:
                try:
                    self._frames.get_nowait()
                except queue.Empty:
                    break
                dropped += 1
            self._splitter.reset()
        return dropped

    def stream_ms_at(self, t: float) -> int:
        """Where the audio heard at time `t` lies in the session's audio, in ms (for audio_start_ms/audio_end_ms)."""
        with self._lock:
            times = list(self._times)
        if not times:
            return 0
        i = bisect.bisect_left([heard for heard, _ in times], t)
        return times[min(i, len(times) - 1)][1]
