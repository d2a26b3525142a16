"""Test doubles and helpers for the conversation engine's tests (imported by them; fixtures are in conftest.py).

`PacedSink` stands in for a client that plays the reply audio as it arrives (heard = the time it
has been playing); `Running` runs `Conversation.run()` on its own thread and collects its events
from an `EventQueue` on the test's; `speak()` streams audio into a `FrameQueue` in real time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.conversation.engine import Conversation
from omni_cli.conversation.events import ConversationEvent, EventQueue
from omni_cli.conversation.frames import FrameQueue
from omni_cli.pipeline import AudioChunk, Done, History, TextDelta

FRAME_MS = 30


class Wrapping:
    """A ReplySource around another (`replies`): the same audio rate, budget and chunk size."""

    def __init__(self, replies) -> None:  # noqa: ANN001 - any ReplySource
        self.replies = replies

    @property
    def sample_rate(self) -> int | None:
        return self.replies.sample_rate

    @property
    def context_budget(self) -> int:
        return self.replies.context_budget

    @property
    def chunk_units(self) -> int | None:
        return getattr(self.replies, "chunk_units", None)


class Recorded(Wrapping):
    """Notes each question and the history it was asked with, then asks `replies` (`token_s`:
    taking at least that long per token, as a bigger model would)."""

    def __init__(self, replies, token_s: float = 0.0) -> None:  # noqa: ANN001 - any ReplySource
        super().__init__(replies)
        self.token_s = token_s
        self.asked: list[tuple[object, list[tuple[str | None, str]]]] = []
        self.ended: list[str] = []  # the pipeline's Done.stopped, per reply

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[object]:
        self.asked.append((audio, [(h.user_text, h.reply) for h in history]))
        for event in self.replies.respond(audio, history, should_stop):
            if isinstance(event, TextDelta):
                time.sleep(self.token_s)
            if isinstance(event, Done):
                self.ended.append(event.stopped)
            yield event


class StallsAfterFirstAudio(Wrapping):
    """Asks `replies`, then spends `stall_s` on the step after its first audio chunk (a slow vocoder
    chunk, a slow GPU), stopping early only when told to, as a model does at its next step."""

    def __init__(self, replies, stall_s: float) -> None:  # noqa: ANN001 - any ReplySource
        super().__init__(replies)
        self.stall_s = stall_s

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[object]:
        stalled = False
        for event in self.replies.respond(audio, history, should_stop):
            yield event
            if isinstance(event, AudioChunk) and not stalled:
                stalled, end = True, time.monotonic() + self.stall_s
                while time.monotonic() < end and not (should_stop is not None and should_stop()):
                    time.sleep(0.005)


class OneReplyAtATime(Wrapping):
    """A model several conversations share, answering one reply at a time: respond() blocks before
    its first event while another reply holds the model (`lock`)."""

    def __init__(self, replies) -> None:  # noqa: ANN001 - any ReplySource
        super().__init__(replies)
        self.lock = threading.Lock()
        self.order: list[tuple[str, object]] = []  # ("start" | "end", question)

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[object]:
        with self.lock:
            self.order.append(("start", audio))
            yield from self.replies.respond(audio, history, should_stop)
            self.order.append(("end", audio))


class PacedSink:
    """A client that plays what it is sent in real time from the first chunk of a burst; stop() cuts it."""

    output_latency = 0.0

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self.first_audio_time: float | None = None
        self.played: list[np.ndarray] = []
        self.stops: list[float] = []  # when stop() was called
        self._lock = threading.Lock()
        self._samples = 0  # queued in this burst
        self._cut: float | None = None  # heard seconds at the last stop()
        self._expecting = False

    def play(self, chunk: np.ndarray) -> None:
        with self._lock:
            if not self._expecting:
                self.first_audio_time, self._samples, self._cut, self._expecting = time.monotonic(), 0, None, True
            self._samples += chunk.size
            self.played.append(chunk)

    def finish(self) -> None:
        with self._lock:
            self._expecting = False

    def stop(self) -> None:
        with self._lock:
            self.stops.append(time.monotonic())
            if self._cut is None:
                self._cut = self._heard()
            self._expecting = False

    def silent_time(self, timeout: float = 0.2) -> float | None:
        return time.monotonic()

    def _heard(self) -> float:
        if self.first_audio_time is None:
            return 0.0
        return min(self._samples / self.rate, time.monotonic() - self.first_audio_time)

    @property
    def heard_seconds(self) -> float:
        with self._lock:
            return self._cut if self._cut is not None else self._heard()

    @property
    def playing(self) -> bool:
        with self._lock:
            return self._cut is None and (self._expecting or self._heard() < self._samples / self.rate)


class Running:
    """`conversation.run()` on its own thread for the `with` block; its events collected here as they come."""

    def __init__(self, conversation: Conversation, events: EventQueue) -> None:
        self.conversation, self.events = conversation, events
        self.seen: list[ConversationEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.conversation.run()
        except BaseException as exc:  # noqa: BLE001 - raised on the test's thread
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conversation.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "run() did not end after stop()"
        self.seen.extend(self.events.drain())
        if self.error is not None:
            raise self.error

    def wait_for(self, kind: type, count: int = 1, timeout: float = 30.0, where: Callable[[object], bool] = lambda e: True) -> ConversationEvent:
        """The `count`-th event of `kind` (matching `where`), waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [e for e in self.seen if isinstance(e, kind) and where(e)]
            if len(matching) >= count:
                return matching[count - 1]
            if self.error is not None:
                raise AssertionError(f"run() failed before {kind.__name__}") from self.error
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} #{count} within {timeout} s; saw {[type(e).__name__ for e in self.seen]}")
            event = self.events.get(timeout=min(left, 0.1))
            if event is not None:
                self.seen.append(event)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.seen]


def speak(frames: FrameQueue, audio: np.ndarray, block_ms: int = FRAME_MS) -> threading.Thread:
    """Send `audio` into `frames` in real time, as a client streams its microphone, on a thread (started)."""
    block = SAMPLE_RATE * block_ms // 1000

    def send() -> None:
        start = time.monotonic()
        for k in range(0, audio.size, block):
            due = start + (k + block) / SAMPLE_RATE
            time.sleep(max(0.0, due - time.monotonic()))
            frames.push(audio[k : k + block])

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def speech_bounds(audio: np.ndarray) -> tuple[float, float]:
    """Where the speech in `audio` starts and ends (seconds): the first and last sample above 2% of its peak."""
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return loud[0] / SAMPLE_RATE, (loud[-1] + 1) / SAMPLE_RATE
