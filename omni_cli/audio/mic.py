"""Microphone: a sounddevice input stream delivering fixed 16 kHz mono frames into a queue.

The device is opened at 16 kHz when it accepts that rate, else at its own default rate with
streaming resampling to 16 kHz, so the rest of the program (VAD, the model) only ever sees
16 kHz frames of exactly frame_ms.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from omni_cli.audio.devices import close_stream, load_sounddevice, open_stream, stream_settings
from omni_cli.audio.stream_resampler import StreamResampler
from omni_cli.audio.vad import FrameSplitter

def _db_removed(heard: np.ndarray, cleaned: np.ndarray) -> float:
    """How much quieter (dB) `cleaned` is than `heard`; 0 for silence."""
    before, after = float(np.dot(heard, heard)), float(np.dot(cleaned, cleaned))
    if before <= 1e-12:
        return 0.0
    return float(10.0 * np.log10(before / max(after, 1e-12)))


class SampleClock:
    """When each captured block ended on time.monotonic(), from the count of samples rather than
    from when its callback happened to run.

    A callback runs some time after its block was captured, and on a busy machine that delay
    varies by tens of milliseconds; the samples themselves arrive at the device's steady rate.
    So the stream's start is taken as the earliest (callback time − samples so far / rate) seen,
    which is the least delayed callback, and a block ends at start + samples / rate. The start may
    creep later by DRIFT per second (the sound card's clock against the system's).
    """

    DRIFT = 1e-4

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.restart()

    def restart(self) -> None:
        """Forget the start (e.g. after lost samples)."""
        self._samples = 0
        self._start: float | None = None
        self._seen_t = 0.0

    def block_end(self, callback_t: float, samples: int) -> float:
        """A block of `samples` was delivered to a callback running at `callback_t`: when it ended."""
        self._samples += samples
        candidate = callback_t - self._samples / self.rate
        if self._start is None:
            self._start = candidate
        else:  # the least delayed callback so far, allowed to creep later with the device's clock
            self._start = min(candidate, self._start + self.DRIFT * (callback_t - self._seen_t))
        self._seen_t = callback_t
        return self._start + self._samples / self.rate


BLOCK_MS = 10

FrameFilter = Callable[[np.ndarray], np.ndarray]
"""Cleans one 16 kHz float32 frame in the audio callback, e.g. `EchoCanceller.process`."""


class Microphone:
    """Capture from an input device as float32 frames of `frame_ms` at `sample_rate` (mono).

    Use as a context manager; `read()` returns the next frame or None on timeout, and sets
    `frame_end_t`: time.monotonic() when that frame's last sample reached the microphone
    (from the count of samples since the stream's start, see SampleClock), so stream times can
    be put on the clock.
    `device` is an index, a (partial) device name, or None for the system default.
    `device_rate` forces the rate the device is opened at (normally chosen automatically).
    Overflows (the device or our queue could not keep up) are counted, never raised.
    `clean`, when given, runs on every frame in the audio callback before it is queued (echo
    cancellation must see the microphone in real time, next to the speaker's reference), so
    every reader (VAD, barge-in, saved WAVs) gets the cleaned signal.
    """

    def __init__(
        self,
        device: str | int | None = None,
        frame_ms: int = 30,
        sample_rate: int = 16000,
        device_rate: int | None = None,
        max_queue_s: float = 10.0,
        clean: FrameFilter | None = None,
    ) -> None:
        self.device = device
        self.frame_ms = frame_ms
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        self.requested_device_rate = device_rate
        self.device_rate: int | None = None  # the rate actually opened, known after start()
        self.device_name = "default"
        self.overflows = 0  # PortAudio reported lost input (the callback ran late)
        self.dropped_frames = 0  # frames discarded because nobody read the queue in time
        self.frames: queue.Queue[tuple[np.ndarray, float, float | None]] = queue.Queue(maxsize=max(1, int(max_queue_s * 1000 / frame_ms)))
        self.frame_end_t: float | None = None  # of the frame read() returned last
        # Of that frame: how much quieter `clean` made it (dB; None without it). Echo the canceller
        # removes loses 10-60 dB; the user's own voice a few dB at most: a barge-in tells them apart by it.
        self.frame_echo_db: float | None = None
        self.clean = clean
        self.last_callback: float | None = None  # time.monotonic() of the latest audio callback (start() counts)
        self._stream: Any = None
        self._channels = 1
        self._resampler = StreamResampler(sample_rate, sample_rate)
        self._splitter = FrameSplitter(self.frame_samples)
        self._clock = SampleClock(sample_rate)

    # -- opening ----------------------------------------------------------------------

    def start(self) -> Microphone:
        """Open and start the input stream; raises AudioInputError with one line on failure."""
        if self._stream is not None:
            return self
        sd = load_sounddevice()
        index, self.device_name, rate, channels = stream_settings(sd, self.device, "input", self.sample_rate, self.requested_device_rate)
        self._channels = channels
        self._resampler = StreamResampler(rate, self.sample_rate)
        self._splitter.reset()
        self._clock = SampleClock(rate)
        self.device_rate = rate
        stream = open_stream(
            sd,
            "input",
            index,
            self.device_name,
            samplerate=rate,
            channels=channels,
            # Small blocks: PortAudio (through PulseAudio) keeps two in flight, so each frame reaches
            # the queue 20 ms after it was heard (60 ms with one 30 ms block per frame); the turn's
            # end and a barge-in are heard that much sooner. Frames are assembled from them.
            blocksize=max(1, round(rate * BLOCK_MS / 1000)),
            latency="low",
            callback=self._callback,
        )
        self.last_callback = time.monotonic()
        self._stream = stream
        return self

    def close(self) -> None:
        """Stop and close the stream; frames already queued stay readable. Returns within ~2 s
        even when the sound server hangs (the stream is then abandoned)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            close_stream(stream)

    def __enter__(self) -> Microphone:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- data path --------------------------------------------------------------------

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        self.last_callback = time.monotonic()
        if status.input_overflow:
            self.overflows += 1
            self._clock.restart()  # samples were lost: the count no longer matches the clock
        block = indata[:, 0] if self._channels == 1 else indata.mean(axis=1)
        self.deliver(block)

    def deliver(self, block: np.ndarray) -> None:
        """Turn one device block into 16 kHz frames on the queue (called by the audio callback)."""
        # Not less the reported input latency: that is the typical callback's delay, and the least
        # delayed one the clock keeps came right after its samples (checked against a recording of
        # the microphone through PulseAudio: subtracting it put frames 20-26 ms early).
        block_end_t = self._clock.block_end(time.monotonic(), block.size)
        if self._resampler.passthrough and block.size == self.frame_samples and self._splitter.pending == 0:
            ready = [np.array(block, dtype=np.float32)]  # copy: PortAudio reuses its buffer
        else:
            ready = self._splitter.push(self._resampler.process(block))
        # The last frame ends where the samples still waiting in the splitter begin.
        end_t = block_end_t - (self._splitter.pending + self.frame_samples * (len(ready) - 1)) / self.sample_rate
        for frame in ready:
            removed_db = None
            if self.clean is not None:
                heard, frame = frame, self.clean(frame)
                removed_db = _db_removed(heard, frame)
            try:
                self.frames.put_nowait((frame, end_t, removed_db))
            except queue.Full:
                self.dropped_frames += 1
            end_t += self.frame_samples / self.sample_rate

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """Next frame (float32, frame_samples long), or None if none arrived within `timeout` seconds."""
        try:
            frame, self.frame_end_t, self.frame_echo_db = self.frames.get(timeout=timeout)
        except queue.Empty:
            return None
        return frame

    def clear(self) -> int:
        """Drop queued frames (e.g. audio captured while we were speaking); returns how many."""
        dropped = 0
        while True:
            try:
                self.frames.get_nowait()
            except queue.Empty:
                return dropped
            dropped += 1

    @property
    def input_latency(self) -> float:
        """Seconds from sound at the device to its frame in our callback (PortAudio's estimate; 0 before start())."""
        return float(self._stream.latency) if self._stream is not None else 0.0

    @property
    def active(self) -> bool:
        """True while the input stream is running."""
        return self._stream is not None and bool(self._stream.active)
