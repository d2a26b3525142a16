"""A Realtime client for the tests and the benchmark: the official `openai` package's connection, driven like a microphone.

`RealtimeClient` opens `OpenAI(base_url=...).realtime.connect(model=...)` (or the beta client,
which sends `OpenAI-Beta: realtime=v1`), collects the server's events on a thread with the time
each arrived, and streams 16 kHz audio as PCM16 at 24 kHz in real time (`stream`), noting when
each block was sent.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import openai

from omni_cli.audio.io import SAMPLE_RATE, resample

RATE = 24000
BLOCK_MS = 40  # what the page's worklet sends; a microphone's block


def pcm16_base64(audio: np.ndarray) -> str:
    """Float audio at 24 kHz → base64 PCM16, as input_audio_buffer.append carries it."""
    return base64.b64encode((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def delta_samples(event: Any) -> int:
    """Samples (24 kHz) in an audio delta event."""
    return len(base64.b64decode(event.delta)) // 2


class RealtimeClient:
    """One Realtime connection through the SDK; its events (with arrival times) gathered as they come."""

    def __init__(self, base_url: str, model: str = "llama-omni", beta: bool = False) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, websocket_base_url=base_url.replace("http://", "ws://"))
        self._manager = client.beta.realtime.connect(model=model) if beta else client.realtime.connect(model=model)
        self.beta = beta
        self.conn: Any = None
        self.events: list[tuple[float, Any]] = []  # (time.monotonic() it arrived, event)
        self.sent: list[tuple[int, float]] = []  # (16 kHz samples sent so far, when), per block
        self._cond = threading.Condition()
        self._errors_seen = 0  # error events a wait_for("error") returned: expected ones
        self._reader: threading.Thread | None = None
        self.closed = False

    def __enter__(self) -> RealtimeClient:
        self.conn = self._manager.__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (as a client that goes away) and stop reading."""
        if not self.closed:
            self.closed = True
            self._manager.__exit__(None, None, None)
        if self._reader is not None:
            self._reader.join(10)

    def _read(self) -> None:
        try:
            for event in self.conn:
                with self._cond:
                    self.events.append((time.monotonic(), event))
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - the connection closed
            pass

    # -- what came ---------------------------------------------------------------------------

    def types(self) -> list[str]:
        with self._cond:
            return [e.type for _, e in self.events]

    def of(self, kind: str, since: int = 0) -> list[Any]:
        """The events of type `kind` so far (from the `since`-th event on)."""
        with self._cond:
            return [e for _, e in self.events[since:] if e.type == kind]

    def mark(self) -> int:
        """How many events have come: a later `since`."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self, kind: str, count: int = 1, timeout: float = 60.0, where: Callable[[Any], bool] = lambda e: True, since: int = 0
    ) -> Any:
        """The `count`-th event of type `kind` (matching `where`, from the `since`-th event on), waiting up to
        `timeout` s. An error event fails it, unless it is one a wait for "error" returned."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                errors = [e for _, e in self.events if e.type == "error"]
                assert kind == "error" or len(errors) <= self._errors_seen, f"error event: {errors[-1].error}"
                matching = [e for _, e in self.events[since:] if e.type == kind and where(e)]
                if len(matching) >= count:
                    if kind == "error":
                        self._errors_seen = max(self._errors_seen, count)
                    return matching[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind} #{count} within {timeout} s; saw {[e.type for _, e in self.events]}")
                self._cond.wait(min(left, 0.1))

    def arrival(self, event: Any) -> float:
        """When `event` arrived."""
        with self._cond:
            return next(t for t, e in self.events if e is event)

    def index(self, event: Any) -> int:
        """Where `event` came among the events."""
        with self._cond:
            return next(k for k, (_, e) in enumerate(self.events) if e is event)

    # -- what is sent ------------------------------------------------------------------------

    def update(self, **session: Any) -> None:
        """session.update with these session fields (GA shape unless beta)."""
        self.conn.session.update(session=session if self.beta else {"type": "realtime", **session})

    def append(self, audio16k: np.ndarray) -> None:
        """Append 16 kHz audio at once (resampled to 24 kHz PCM16)."""
        self.conn.input_audio_buffer.append(audio=pcm16_base64(resample(audio16k, SAMPLE_RATE, RATE)))

    def stream(self, audio16k: np.ndarray, block_ms: int = BLOCK_MS, stop: Callable[[], bool] = lambda: False) -> None:
        """Send 16 kHz audio as a microphone would: `block_ms` blocks of PCM16 at 24 kHz, each when it has been "heard"."""
        at24 = resample(audio16k, SAMPLE_RATE, RATE)
        block = RATE * block_ms // 1000
        start = time.monotonic()
        sent16 = self.sent[-1][0] if self.sent else 0
        for k in range(0, at24.size, block):
            due = start + (k + block) / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            if stop():
                return
            self.conn.input_audio_buffer.append(audio=pcm16_base64(at24[k : k + block]))
            self.sent.append((sent16 + min(at24.size, k + block) * SAMPLE_RATE // RATE, time.monotonic()))

    def stream_in_background(self, audio16k: np.ndarray) -> threading.Thread:
        """stream() on a thread (started); join it."""
        thread = threading.Thread(target=self.stream, args=(audio16k,), daemon=True)
        thread.start()
        return thread

    def sent_time_of(self, sample16k: int) -> float:
        """When the block holding 16 kHz sample `sample16k` (counted over the session) was sent."""
        return next(t for end, t in self.sent if end > sample16k)
