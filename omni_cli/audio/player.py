"""Player: a sounddevice output stream fed from a queue of 16 kHz float32 chunks.

The stream runs from start() to close() and plays zeros while idle, so the first chunk of a
reply reaches the device at the next callback instead of waiting for a stream to open.
`stop()` is the barge-in: queued audio is dropped and the next callback is silent.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from omni_cli.audio.devices import close_stream, load_sounddevice, open_stream, stream_settings
from omni_cli.audio.stream_resampler import StreamResampler

# Through PulseAudio, PortAudio keeps two blocks in flight: 15 ms blocks give 30 ms of output
# latency (20 ms blocks: 40 ms). 10 ms blocks underflow there (the stream falls silent) unless
# the latency asked for is raised to 30 ms, and even then some blocks come late.
BLOCK_MS = 15


class Player:
    """Play float32 chunks at `sample_rate` on an output device, continuously, cut-able at once.

    Producer side (any thread): `play(chunk)` queues audio, `wait_idle()` waits until it has
    been played, `stop()` cuts it and `silent_time()` says when the speaker fell silent. Audio
    side: the stream callback calls `render()`, which hands every block it fills (silence
    included) to `on_render(block, device_rate)`, e.g. an echo canceller's reference.
    Measurements: `first_audio_time` (time.monotonic() when the first block holding audio of
    the current burst was handed to the device; `on_first_audio` is called with it, from the
    audio thread, so keep it short; it is heard `output_latency` later), `heard_seconds` (the
    current burst's audio handed to the device so far), `underruns` (times the queue ran dry
    while more audio was expected), `xruns` (PortAudio-reported output underflows).
    """

    def __init__(
        self,
        device: str | int | None = None,
        sample_rate: int = 16000,
        block_ms: int = BLOCK_MS,
        device_rate: int | None = None,
        latency: str | float = "low",
        on_first_audio: Callable[[float], None] | None = None,
        on_render: Callable[[np.ndarray, int], None] | None = None,
    ) -> None:
        self.device = device
        self.sample_rate = sample_rate
        self.block_ms = block_ms
        self.requested_device_rate = device_rate
        self.latency = latency
        self.on_first_audio = on_first_audio
        self.on_render = on_render
        self.device_rate: int | None = None  # the rate actually opened, known after start()
        self.device_name = "default"
        self.first_audio_time: float | None = None
        self.underruns = 0
        self.xruns = 0
        self._stream: Any = None
        self._resampler = StreamResampler(sample_rate, sample_rate)
        # deque append/popleft are atomic in CPython: no lock on the audio thread.
        self._pending: deque[tuple[int, np.ndarray]] = deque()
        self._generation = 0  # bumped by stop(); chunks of an older generation are dropped
        self._current: np.ndarray | None = None
        self._current_generation = 0
        self._position = 0
        self._expecting = False  # between the first play() of a burst and wait_idle()/finish()/stop()
        self._starved = False  # the queue ran dry during this burst and has not been refilled
        self._idle = threading.Event()
        self._idle.set()
        # Serialises play/finish/stop (a producer and a barge-in thread may race); the callback only
        # tries it without blocking, to set `_idle` atomically with the producer's updates.
        self._producer_lock = threading.Lock()
        self._output_latency = 0.0
        # Kept by the audio thread (stop() settles the last three when nothing is playing): queued
        # samples handed to the device (all bursts), the time of the last block that carried
        # audio, and the first block after a stop() (when the speaker went silent).
        self._rendered = 0
        self._last_audio_t: float | None = None
        self._rendered_generation = 0
        self._silent_t: float | None = None
        self._silenced = threading.Event()
        self._silenced.set()
        self._burst_start = 0  # _rendered when the current burst began (the producer's)

    # -- opening ----------------------------------------------------------------------

    def start(self) -> Player:
        """Open and start the output stream (silent until audio is queued)."""
        if self._stream is not None:
            return self
        sd = load_sounddevice()
        index, self.device_name, rate, channels = stream_settings(sd, self.device, "output", self.sample_rate, self.requested_device_rate)
        self.device_rate = rate
        self._resampler = StreamResampler(self.sample_rate, rate)
        stream = open_stream(
            sd,
            "output",
            index,
            self.device_name,
            samplerate=rate,
            channels=channels,
            blocksize=max(1, round(rate * self.block_ms / 1000)),
            latency=self.latency,
            callback=self._callback,
        )
        self._output_latency = float(stream.latency)
        self._stream = stream
        return self

    def close(self) -> None:
        """Stop and close the stream; queued audio is dropped."""
        self.stop()
        stream, self._stream = self._stream, None
        if stream is not None:
            close_stream(stream)

    def __enter__(self) -> Player:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- producer side ----------------------------------------------------------------

    def play(self, chunk: np.ndarray) -> None:
        """Queue a mono float32 chunk at `sample_rate` to play after what is already queued."""
        samples = np.asarray(chunk, dtype=np.float32).reshape(-1)
        with self._producer_lock:
            if not self._expecting:
                # A new burst (e.g. a new reply): latency and starvation are measured per burst.
                self.first_audio_time = None
                self._starved = False
                self._expecting = True
                self._burst_start = self._rendered
            # Resample here, on the producer's thread, so the callback only copies.
            samples = self._resampler.process(samples)
            if samples.size:
                self._idle.clear()
                self._pending.append((self._generation, samples))

    def finish(self) -> None:
        """No more audio follows for now: play out what is queued without counting the end as an underrun."""
        with self._producer_lock:
            tail = self._resampler.flush()
            if tail.size:
                self._idle.clear()
                self._pending.append((self._generation, tail))
            self._expecting = False

    def stop(self) -> None:
        """Cut playback now: queued audio is dropped and the next device block is silence.

        The producer should stop too: a later play() starts a new burst.
        """
        with self._producer_lock:
            sounding = self._current is not None or bool(self._pending)
            self._generation += 1
            self._expecting = False
            self._pending.clear()
            self._resampler.reset()
            if sounding:
                self._silenced.clear()  # the next callback marks the first silent block
            else:  # nothing was being played: silent once the last block with audio is out
                self._silent_t = max(time.monotonic(), (self._last_audio_t or 0.0) + self._output_latency)
                self._rendered_generation = self._generation
                self._silenced.set()

    def silent_time(self, timeout: float = 0.2) -> float | None:
        """After stop(): time.monotonic() when the speaker went silent — when the first block
        without the cut audio was handed to the device, plus the output latency — waiting up to
        `timeout` for that block; None if no block came (a stalled device)."""
        if not self._silenced.wait(timeout):
            return None
        return self._silent_t

    @property
    def heard_seconds(self) -> float:
        """Seconds of the current (or last) burst's audio handed to the device so far: after a
        stop(), how much of the cut reply was played."""
        return (self._rendered - self._burst_start) / (self.device_rate or self.sample_rate)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """finish(), then wait until all queued audio has left the speaker; False on timeout."""
        self.finish()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._idle.wait(timeout):
            return False
        # The last block is in the device's buffer for `latency` more seconds.
        remaining = self._output_latency if deadline is None else min(self._output_latency, deadline - time.monotonic())
        if remaining > 0:
            time.sleep(remaining)
        return True

    @property
    def playing(self) -> bool:
        """True while audio is queued, being handed to the device, or still expected from the producer."""
        return self._expecting or not self._idle.is_set()

    @property
    def output_latency(self) -> float:
        """Seconds from handing a block to the device until it is heard (PortAudio's estimate)."""
        return self._output_latency

    @property
    def active(self) -> bool:
        """True while the output stream runs (PortAudio stops it when the sound server goes away)."""
        return self._stream is not None and bool(self._stream.active)

    # -- audio side -------------------------------------------------------------------

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.output_underflow:
            self.xruns += 1
        self.render(outdata)

    def render(self, out: np.ndarray) -> None:
        """Fill one device block `out` (frames × channels) from the queue, zeros where none is left.

        Runs on the audio thread: never waits for the producer, allocates nothing but views.
        """
        generation = self._generation
        cut = generation != self._rendered_generation  # the first block since stop()
        if self._current is not None and self._current_generation != generation:
            self._current = None  # stop() was called: drop the chunk being played
        n = out.shape[0]
        written = 0
        while written < n:
            if self._current is None:
                try:
                    chunk_generation, chunk = self._pending.popleft()
                except IndexError:
                    break
                if chunk_generation != generation:
                    continue
                self._current, self._current_generation, self._position = chunk, chunk_generation, 0
            current = self._current
            take = min(n - written, current.shape[0] - self._position)
            out[written : written + take] = current[self._position : self._position + take, None]
            written += take
            self._position += take
            if self._position >= current.shape[0]:
                self._current = None
        if written < n:
            out[written:] = 0.0
        if cut:
            self._rendered_generation = generation
            self._silent_t = time.monotonic() + self._output_latency
            self._silenced.set()
        if self.on_render is not None:
            self.on_render(out, self.device_rate or self.sample_rate)
        if written:
            self._rendered += written
            self._last_audio_t = time.monotonic()
            self._starved = False
            if self.first_audio_time is None:
                self.first_audio_time = self._last_audio_t
                if self.on_first_audio is not None:
                    self.on_first_audio(self.first_audio_time)
        if written < n and self._current is None and not self._pending:
            if self._expecting and self.first_audio_time is not None and not self._starved:
                self.underruns += 1
                self._starved = True
            if not self._idle.is_set() and self._producer_lock.acquire(blocking=False):
                # Decide under the producer's lock: otherwise a play() landing between our checks
                # and set() would leave its audio queued with `_idle` set. Never wait for it:
                # if a producer holds the lock, the next callback decides.
                try:
                    if not self._expecting and not self._pending:
                        self._idle.set()
                finally:
                    self._producer_lock.release()


def output_latency(device: str | int | None = None, sample_rate: int = 16000) -> float:
    """Seconds from handing audio to the output device until it is heard, as the device reports it
    for omni's stream (opened briefly, silent); raises AudioInputError with one line when it cannot open."""
    player = Player(device=device, sample_rate=sample_rate).start()
    try:
        return player.output_latency
    finally:
        player.close()
