"""What a conversation tells its front door: small frozen events, each stamped with time.monotonic().

`t` on every event is when it was emitted; times named `*_t` are time.monotonic() too (the
clock the microphone frames, the pipeline and the player use), so a front door measures
latency where it happens. Stream times (`*_stream_t`) are seconds of input audio since the
conversation began: what a protocol reports as `audio_start_ms` / `audio_end_ms`.

One turn, spoken with turn detection on, reads:
    SpeechStarted → SpeechStopped → QuestionCommitted → ReplyStarted
    → (ReplyTextDelta | ReplyAudio | ReplyPlaybackStarted)* → ReplyDone → Listening
A client-committed or typed turn starts at QuestionCommitted. The names follow the OpenAI
Realtime protocol's where one exists (input_audio_buffer.speech_started / speech_stopped /
committed, response.created, response.output_audio_transcript.delta,
response.output_audio.delta, response.done).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Literal

import numpy as np

from omni_cli.conversation.turns import UserTurn

ReplyEnd = Literal["completed", "budget", "interrupted", "cancelled", "error"]
"""Why a reply stopped: it ran to its end; it reached the token budget; speech interrupted it
(barge-in, or the user went on with the question); cancel() or stop() cut it; it failed."""


@dataclass(frozen=True)
class Listening:
    """The conversation listens: at the first input frame (`first`: from here the user is heard),
    and again after each spoken turn's reply."""

    t: float
    first: bool = False


@dataclass(frozen=True)
class SpeechStarted:
    """Turn detection heard speech begin (or, at a barge-in, begin to interrupt a reply).

    `continued`: this speech was already announced — by the BargeIn it caused, or before its
    question passed a 30 s window — so a protocol that pairs started/stopped skips it.
    """

    t: float
    onset_t: float  # the first voiced frame's start
    stream_t: float
    continued: bool = False


@dataclass(frozen=True)
class SpeechStopped:
    """The user's turn ended: `speech_end_t` is the true end of voiced speech (latency counts from
    here), `t` the end-of-turn decision, a hang-over later."""

    t: float
    speech_end_t: float
    stream_t: float  # stream time of speech_end_t


@dataclass(frozen=True)
class QuestionCommitted:
    """A user turn to answer: 16 kHz speech (`audio`) or typed `text`, numbered `turn`.

    `heard` holds its timings (`end_t`, `speech_end_t`, `end_of_turn_ms`, `windows`) and, in
    `heard.continues`, the earlier turn it goes on with (whose reply was withdrawn).
    """

    t: float
    turn: int
    heard: UserTurn
    audio: np.ndarray | None = None
    text: str | None = None

    @property
    def question(self) -> np.ndarray | str:
        """The speech or the text, whichever it is."""
        return self.text if self.text is not None else self.audio  # type: ignore[return-value]


@dataclass(frozen=True)
class ReplyStarted:
    """The model is asked for turn `turn`'s reply (`speculative`: it was started at a pause before
    the turn ended, and already holds what it made meanwhile). respond() may still wait for the model."""

    t: float
    turn: int
    speculative: bool = False


@dataclass(frozen=True)
class ReplyTextDelta:
    """More reply text, as the LLM writes it; `tokens` generated so far."""

    t: float
    turn: int
    text: str
    tokens: int


@dataclass(frozen=True)
class ReplyAudio:
    """A chunk of reply speech as generated (float32 mono at `sample_rate`, `index` from 0).

    It is also handed to the conversation's AudioSink (after the jitter buffer); this event is
    for front doors that record or forward audio themselves.
    """

    t: float
    turn: int
    audio: np.ndarray
    sample_rate: int
    index: int
    tokens: int  # LLM tokens generated when it was rendered


@dataclass(frozen=True)
class ReplyPlaybackStarted:
    """The reply's first audio went to the AudioSink; `interruptible`: speaking over it stops it."""

    t: float
    turn: int
    interruptible: bool


@dataclass(frozen=True)
class BargeIn:
    """Speech during turn `turn`'s reply stopped it: heard at `onset_t`, detected at `detected_t`,
    the sink silent at `stopped_t`. `goes_on`: it began within `rejoin_ms` of the question's end,
    so the reply is withdrawn and both parts will be asked as one question."""

    t: float
    turn: int
    onset_t: float
    detected_t: float
    stopped_t: float
    stream_t: float  # stream time of the onset
    goes_on: bool


@dataclass(frozen=True)
class ReplyDone:
    """Turn `turn`'s reply is over, and what the history keeps of it is settled.

    `text` is everything generated; `heard_text` what the user heard (the history keeps it): all of
    `text` unless the reply was cut short (barge-in, cancel(), a truncate() report) while its
    audio played, when it is the text of the tokens whose speech had been heard. `audio` is
    what was heard of the reply's speech (None when it had none), at `audio_rate`;
    `heard_seconds` is set when it did not play to its end.
    """

    t: float
    turn: int
    reason: ReplyEnd
    text: str
    heard_text: str
    tokens: int
    units: int
    audio: np.ndarray | None
    audio_rate: int
    heard_seconds: float | None = None
    speech_end_t: float = 0.0  # when the user stopped (Enter for typed text): what latency counts from
    first_text_t: float | None = None
    first_audio_t: float | None = None  # the first reply sample out of the sink (handed over + its output latency)
    first_text_ms: float | None = None
    latency_ms: float | None = None  # speech_end_t → first_audio_t: what the user waited
    speculative: bool = False
    barge_in_t: float | None = None
    withdrawn: bool = False  # the user went on with the question: not an answer to anything
    echo_erle_db: float | None = None  # the echo canceller's echo removal, when the reply played
    error: str | None = None  # one line, for reason "error"
    playback_t: float | None = None  # when its first audio was handed to the sink (first_audio_t: when heard)


@dataclass(frozen=True)
class ReplyTruncated:
    """truncate() settled: turn `turn`'s reply counts as heard for `heard_seconds`; the history keeps `heard_text`."""

    t: float
    turn: int
    heard_seconds: float
    heard_text: str


@dataclass(frozen=True)
class DraftDropped:
    """A reply started at a pause was thrown away: the user spoke on (`after_pause_ms` of silence, `tokens` made)."""

    t: float
    after_pause_ms: float
    tokens: int


@dataclass(frozen=True)
class FullDuplexOn:
    """The echo canceller has converged: from turn `turn` on, speaking over a reply interrupts it."""

    t: float
    turn: int
    erle_db: float | None


@dataclass(frozen=True)
class StillListening:
    """The question passed the model's 30 s window while speech went on; what follows is appended to it."""

    t: float
    seconds: float
    windows: int


@dataclass(frozen=True)
class SpeakerDropped:
    """The AudioSink failed (`why`, one line): replies go on as text only."""

    t: float
    turn: int
    why: str


@dataclass(frozen=True)
class ConversationError:
    """Something failed; the conversation goes on. `code`: "reply_failed" (the model failed on
    turn `turn`), "question_too_long" (turn `turn`'s question cannot fit the context budget; the
    model did not run), "empty_input" (commit() with nothing heard), "no_reply" (cancel() with no reply
    in progress), "unknown_turn" (truncate() of a turn the history does not hold)."""

    t: float
    code: str
    message: str
    turn: int | None = None


ConversationEvent = (
    Listening
    | SpeechStarted
    | SpeechStopped
    | QuestionCommitted
    | ReplyStarted
    | ReplyTextDelta
    | ReplyAudio
    | ReplyPlaybackStarted
    | BargeIn
    | ReplyDone
    | ReplyTruncated
    | DraftDropped
    | FullDuplexOn
    | StillListening
    | SpeakerDropped
    | ConversationError
)


class EventQueue:
    """A thread-safe queue of events for a front door that drains them on another thread: pass it as `on_event`."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[ConversationEvent] = queue.SimpleQueue()

    def __call__(self, event: ConversationEvent) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> ConversationEvent | None:
        """The next event, waiting up to `timeout` (None: for ever); None if none came."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[ConversationEvent]:
        """Every event waiting now."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events
