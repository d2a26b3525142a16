"""What a conversation needs from the world around it: the model, the input frames, the output, the echo canceller.

Each is a Protocol, so the terminal passes its devices (`Microphone`, `Player`, `EchoCanceller`),
a server passes its network source and sink, and tests pass fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from omni_cli.pipeline import Event, History


class ReplySource(Protocol):
    """What the conversation needs from the model: `SpeechToSpeech` or a test double.

    `respond()` may block before its first event (e.g. while another conversation's reply
    holds the model); nothing in the conversation assumes it returns at once.
    Optional: `chunk_units` (units per audio chunk after the first), for the jitter buffer.
    """

    @property
    def sample_rate(self) -> int | None:
        """The reply audio's rate (the sink is opened at it); None when replies are text only."""

    @property
    def context_budget(self) -> int:
        """Prompt positions for history, question and reply: turns beyond it are not kept."""

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]: ...


class FrameSource(Protocol):
    """Input audio: 16 kHz mono float32 frames of the turn detector's frame length, in order.

    `Microphone`, or `FrameQueue` for frames a client sends. `frame_end_t` (time.monotonic() when
    the frame read last ended, as heard) may be None: the frame is then taken to have ended when
    it was read. Optional, `frame_echo_db`: how much an echo canceller took out of that frame
    (dB; None or absent: no canceller), so that barge-in can tell the user's voice from residual
    echo. `read()` returns None when no frame came within `timeout`; `clear()` drops what is
    waiting and says how many frames it dropped. Optional, `flush()`: complete a partial
    frame (called by commit(), from the caller's thread, so the end of a turn can be read).
    """

    frame_end_t: float | None

    def read(self, timeout: float | None = None) -> np.ndarray | None: ...

    def clear(self) -> int: ...


class AudioSink(Protocol):
    """Where reply audio goes: `Player` (the speaker), or a sink that sends it to a client.

    `play()` must not block (it queues); `stop()` cuts playback at once and may be called from
    another thread; `heard_seconds` is how much of the current burst was heard (for a client:
    what it reports it played); `silent_time()` says when the output fell silent after stop();
    `first_audio_time` when the burst's first audio was handed over (heard `output_latency` later).
    """

    first_audio_time: float | None

    def play(self, chunk: np.ndarray) -> None: ...

    def finish(self) -> None: ...

    def stop(self) -> None: ...

    def silent_time(self, timeout: float = 0.2) -> float | None: ...

    @property
    def heard_seconds(self) -> float: ...

    @property
    def playing(self) -> bool: ...

    @property
    def output_latency(self) -> float: ...


class EchoState(Protocol):
    """What the conversation reads from the echo canceller: `EchoCanceller` or a test double.

    Optional, `bypassed`: True when no echo path was found (nothing played reaches the microphone).
    """

    @property
    def converged(self) -> bool: ...

    @property
    def erle_db(self) -> float | None: ...
