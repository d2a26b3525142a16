"""Turn-taking: what the user says, heard as turns.

`Listener` puts the input frames through the endpointer (and, while a reply plays, watches for
barge-in or drops what was heard); `SpokenQuestion` gathers the audio of the question being
spoken across 30 s windows and across a reply the user talked over; `SpeculativeReply` is a
reply started at a pause before the turn is known to be over; `UserTurn` says when a turn
ended. `engine.Conversation` uses them to answer each turn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.audio.vad import Endpointer, EndpointerConfig, SpeechEnd, SpeechPause, SpeechStart
from omni_cli.audio.vad import Event as VadEvent
from omni_cli.conversation.generation import Generation
from omni_cli.conversation.ports import FrameSource
from omni_cli.errors import AudioInputError
from omni_cli.pipeline import Event


@dataclass(frozen=True)
class ConversationSettings:
    """Turn-taking settings, one set per conversation."""

    # Turn detection: the endpointer (server VAD: webrtcvad + Silero, its hang-over `hangover_ms`
    # and pre-roll padding `pre_roll_ms`; `pause_ms` > 0 for speculative starts), or None: the
    # client commits its turns (commit()).
    turn_detection: EndpointerConfig | None = field(default_factory=EndpointerConfig)
    # In full duplex, the turn ends after this much silence when turn_detection.hangover_ms is longer:
    # a guess the user takes back by going on (within rejoin_ms the reply stops, is withdrawn, and
    # both parts are one question). None: always the hang-over.
    full_duplex_hangover_ms: int | None = None
    # True: full duplex (speaking over a reply interrupts it); False: half-duplex; None: full
    # duplex once the echo canceller has converged, half-duplex before and without one.
    barge_in: bool | None = False
    speculate: bool = False  # start replies at the endpointer's SpeechPause events
    max_question_windows: int = 4  # 30 s windows appended into one question before it is answered anyway
    # Voice that stops a reply. Shorter than a turn's start (min_speech_ms, 200): the speaker must
    # fall silent soon after the user's onset (a reply that began in a mid-sentence pause is heard
    # until then); the echo canceller and Silero keep it from firing on echo (60 ms let residual
    # echo through on open speakers now and then).
    barge_in_ms: int = 90
    # Speech that interrupts a reply this soon after the end of the question goes on with it: the
    # question had a pause longer than the hang-over. The reply is withdrawn and both parts are one question.
    rejoin_ms: int = 1000
    poll_s: float = 0.05  # how long a wait for the next input frame (or command) blocks while listening or speaking
    # No frame for this long means the microphone is gone (MicrophoneLost); None: no watch (a
    # client sends audio only when it has some).
    mic_timeout_s: float | None = 3.0
    playback_margin_s: float = 3.0  # playback may lag generation by this much before the sink counts as stuck


# While the echo canceller is not yet removing a reply's echo well (its ERLE under GOOD_ERLE_DB:
# right after the warm-up, before it has learnt speech), a voiced frame counts toward a barge-in
# only if the canceller took less than NEAR_END_DB out of it.
# Measured on speech echo at 0 and -6 dB (after the warm-up): 95 % of echo-only frames lose more
# (median 43-46 dB), 70-75 % of the user's frames during double talk lose less (median 4 dB: AEC3
# ducks the user where the echo is louder). A voiced frame that lost more takes one back.
NEAR_END_DB = 12.0
GOOD_ERLE_DB = 30.0
# While replying, at most this many frames are heard at a time, so that the reply's state (full
# duplex switched on, a cancel, the devices) is looked at again between them even when frames come
# as fast as they are heard.
FRAMES_A_STEP = 8
# A half-duplex reply's echo may reach the microphone this long after the reply ends (output and
# input latency and the room): speech heard over the reply counts only if its voice goes on past it.
ECHO_TAIL_S = 0.3
# While replying in full duplex, this much audio is kept before the user's first voiced frame:
# early in a session the canceller ducks the user's voice under a loud echo (0.2-1.3 s measured
# at 0 dB, 30 ms), so a barge-in is heard late; the question then still has its first words.
BARGE_IN_PRE_ROLL_MS = 1500
# Voice that stops a reply while it would go on with the question (within rejoin_ms of its last
# word: the reply most likely began in a pause of the user's), once the canceller has converged and
# counting only frames it left almost whole (NEAR_END_DB): one frame instead of barge_in_ms. Each
# such false start was heard ~100 ms after the user went on before the reply stopped (90 ms of voice).
GOING_ON_BARGE_IN_MS = 30


class MicrophoneLost(AudioInputError):
    """The microphone stopped delivering audio in the middle of a session."""


class Listener:
    """The microphone through the endpointer: what the user says, as endpointer events.

    While listening, `next_events()` gives the events of the next frame, after those held back
    during a reply. While replying, `speech_start()` (barge-in) drains the queue until the user
    starts speaking and `hear_quietly()` (half-duplex) keeps what the mic heard without interrupting.
    `clock_of(stream_t)` puts an endpointer time on time.monotonic().
    """

    def __init__(
        self,
        mic: FrameSource,
        endpointer: Endpointer,
        settings: ConversationSettings,
        clock: Callable[[], float],
        on_first_frame: Callable[[float], None] | None,
    ) -> None:
        self.mic = mic
        self.endpointer = endpointer
        self.settings = settings
        self.clock = clock
        self.on_first_frame: Callable[[float], None] | None = on_first_frame
        self.held: deque[VadEvent] = deque()  # endpointer events heard while replying, for the listening loop
        # While replying: voice that the echo canceller left almost whole (net). The endpointer's
        # start of the utterance in progress (None outside one): a barge-in may come late in it.
        self._near_voiced_s = 0.0
        self._clear_voiced_s = 0.0  # voice the canceller left almost whole since its last voiced frame it did not
        self._speech_start: SpeechStart | None = None
        self._barged_in = False  # a barge-in's utterance has not ended yet: it keeps BARGE_IN_PRE_ROLL_MS
        self.last_frame_t = clock()  # when a frame last came (or the watch was restarted)
        self._anchor = (0.0, self.last_frame_t)  # (endpointer time, clock time) at the end of the last frame pushed

    def next_events(self, timeout: float | None = None) -> list[VadEvent]:
        """One held-back event, else the next frame's events ([] if none came within `timeout`,
        default poll_s); raises MicrophoneLost."""
        if self.held:
            return [self.held.popleft()]
        endpointer = self.endpointer
        if not self._barged_in and endpointer.onset is None and not endpointer.in_speech:  # never while an utterance may take it
            endpointer.set_pre_roll_ms(endpointer.config.pre_roll_ms)
        frame = self.mic.read(timeout=self.settings.poll_s if timeout is None else timeout)
        now = self.clock()
        if frame is None:
            limit = self.settings.mic_timeout_s
            if limit is not None and now - self.last_frame_t > limit:
                raise MicrophoneLost(
                    f"the microphone stopped delivering audio for {limit:.0f} s "
                    "(unplugged, or taken by another program?); check it with `omni devices`."
                )
            return []
        self.last_frame_t = now
        if self.on_first_frame is not None:
            self.on_first_frame(now)
            self.on_first_frame = None
        return self._push(frame)

    def _push(self, frame: np.ndarray) -> list[VadEvent]:
        events = self.endpointer.push(frame)
        for event in events:  # the start of the utterance in progress, for a barge-in that comes later in it
            self._speech_start = event if isinstance(event, SpeechStart) else None if isinstance(event, SpeechEnd) else self._speech_start
            self._barged_in = self._barged_in and not isinstance(event, SpeechEnd)
        ended = self.mic.frame_end_t
        self._anchor = (self.endpointer.time, self.clock() if ended is None else ended)
        return events

    def clock_of(self, stream_t: float) -> float:
        """The time.monotonic() of endpointer stream time `stream_t` (exact for the frames just pushed)."""
        stream_now, clock_now = self._anchor
        return clock_now - (stream_now - stream_t)

    def restart_watch(self) -> None:
        """Count the microphone's silence from now (frames are not watched during a reply)."""
        self.last_frame_t = self.clock()

    def speech_start(self, timeout: float, echo_left: bool = False, going_on: bool = False) -> SpeechStart | None:
        """Barge-in: push what the mic has (waiting up to `timeout` for a first frame) until speech starts.

        Speech counts as started after `settings.barge_in_ms` of voice, before the endpointer's own
        SpeechStart (min_speech_ms) when that is shorter. `echo_left`: the echo canceller is not yet
        removing the reply's echo well, so only voice it left almost whole counts (NEAR_END_DB: not
        its residual echo; net of voiced frames it did not). `going_on`: voice now would go on with
        the question, so GOING_ON_BARGE_IN_MS of voice the canceller left whole is enough (unless
        `echo_left`). Every endpointer event is held for the listening loop.
        """
        block = timeout
        self.endpointer.set_pre_roll_ms(max(BARGE_IN_PRE_ROLL_MS, self.endpointer.config.pre_roll_ms))
        for _ in range(FRAMES_A_STEP):
            frame = self.mic.read(timeout=block)
            block = 0.0
            if frame is None:
                return None
            events = self._push(frame)
            self.held.extend(events)
            endpointer = self.endpointer
            if endpointer.last_voiced:  # the user's voice, or echo the canceller left?
                removed = getattr(self.mic, "frame_echo_db", None)
                step = endpointer.config.frame_ms / 1000
                whole = removed is None or removed < NEAR_END_DB
                near = not echo_left or whole
                self._near_voiced_s = self._near_voiced_s + step if near else max(0.0, self._near_voiced_s - step)
                self._clear_voiced_s = self._clear_voiced_s + step if whole else 0.0
            elif not endpointer.in_speech and endpointer.onset is None:
                self._near_voiced_s = self._clear_voiced_s = 0.0
            quick = going_on and not echo_left and self._clear_voiced_s * 1000 >= GOING_ON_BARGE_IN_MS
            if quick or self._near_voiced_s * 1000 >= self.settings.barge_in_ms:
                onset = endpointer.onset
                start = SpeechStart(t=onset[0]) if onset is not None else self._speech_start
                if start is not None:
                    self._near_voiced_s = self._clear_voiced_s = 0.0
                    self._barged_in = True
                    return start
        return None

    def hear_quietly(self, timeout: float) -> None:
        """Half-duplex: push what the mic has (waiting up to `timeout` for a first frame), holding its
        events, but never interrupt: much of it is our own voice. `keep_after_reply()` sorts it out."""
        block = timeout
        for _ in range(FRAMES_A_STEP):
            frame = self.mic.read(timeout=block)
            if frame is None:
                return
            block = 0.0
            self.held.extend(self._push(frame))

    def keep_after_reply(self) -> float:
        """A half-duplex reply is over: of what was heard meanwhile, drop the utterances that ended
        (they may have been its echo) and keep the one still going, if any (the user may have
        spoken over the reply: answered after it). Returns the stream time until which an
        utterance's voice may still be echo (see ECHO_TAIL_S)."""
        ends = [k for k, event in enumerate(self.held) if isinstance(event, SpeechEnd)]
        if ends:
            for _ in range(ends[-1] + 1):
                self.held.popleft()
        return self.endpointer.time + ECHO_TAIL_S


class SpeculativeReply:
    """A reply started at a pause in the user's speech, before the turn is known to be over.

    It is generated on the model thread (`generation`) while the conversation listens on.
    `advance()` takes what it has made so far; once the turn is committed, `get()` hands out
    those events, then the rest, as `Generation.get` does. An exception from the model is kept
    and raised by get(), where a committed reply's errors are handled; a discarded reply's never
    surface.
    """

    def __init__(self, generation: Generation, question: np.ndarray, pause: SpeechPause) -> None:
        self.generation = generation
        self.question = question
        self.pause = pause
        self.buffered: list[Event] = []
        self._replayed = 0  # buffered events get() has handed out
        self.error: Exception | None = None

    @property
    def voiced_end_t(self) -> float:
        return self.pause.voiced_end_t

    @property
    def tokens(self) -> int:
        return max((getattr(e, "tokens", 0) for e in self.buffered), default=0)

    def advance(self) -> None:
        """Take the events made so far (without waiting). Voice that goes on with the question
        discards the draft, so it costs at most the silence it ran in (and the step it was in)."""
        while self.error is None:
            try:
                event = self.generation.get(0.0)  # None once nothing is left, or all was taken
            except Exception as exc:  # noqa: BLE001 - raised again if this reply is committed
                self.error = exc
                return
            if event is None:
                return
            self.buffered.append(event)

    @property
    def finished(self) -> bool:
        """All its events were handed out by get() (or its error raised)."""
        return self._replayed >= len(self.buffered) and self.error is None and self.generation.finished

    def get(self, timeout: float) -> Event | None:
        """The committed reply's next event: the buffered ones first, then the model's (see `Generation.get`)."""
        if self._replayed < len(self.buffered):
            self._replayed += 1
            return self.buffered[self._replayed - 1]
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.generation.get(timeout)

    def close(self) -> None:
        """Stop generating (at the model's next step): the draft was dropped, or its reply is over."""
        self.generation.close()


@dataclass(frozen=True)
class UserTurn:
    """When a turn ended: `end_t` (the end-of-turn decision, or Enter), `speech_end_t` (the true end
    of speech: latency is measured from it; Enter for typed text), and the end-of-turn delay."""

    end_t: float
    speech_end_t: float
    end_of_turn_ms: float | None = None
    windows: int = 1  # 30 s windows the question spans
    voiced_end_stream_t: float | None = None  # spoken: endpointer time of speech_end_t
    audio_end_stream_t: float = 0.0  # endpointer time where the question's audio ends
    continues: int | None = None  # the turn whose question this one goes on with (its reply was withdrawn)


@dataclass(frozen=True)
class ContinuedQuestion:
    """A question the user went on with after its reply had started: it heads the next one."""

    audio: np.ndarray
    audio_end_stream_t: float  # endpointer time where `audio` ends
    turn: int
    onset_stream_t: float  # where the speech that goes on with it began
    voiced_end_stream_t: float | None = None  # where its last word ended


class SpokenQuestion:
    """The audio of the question being spoken, when it spans more than one utterance.

    It holds the earlier 30 s windows of this turn (the endpointer ends an utterance at the
    model's window while speech goes on), and a question whose reply was withdrawn because the
    user went on with it (`go_on_with`): both head the next question asked.
    """

    def __init__(self) -> None:
        self.windows: list[np.ndarray] = []
        self.window_end_stream_t = 0.0  # endpointer time where the last kept window ends
        self.continued: ContinuedQuestion | None = None

    @property
    def seconds(self) -> float:
        """The length of the windows kept so far."""
        return sum(w.size for w in self.windows) / SAMPLE_RATE

    def keep_window(self, audio: np.ndarray, end_stream_t: float) -> None:
        """An utterance cut at the model's 30 s window: it is part of the question."""
        self.windows.append(audio)
        self.window_end_stream_t = end_stream_t

    def go_on_with(self, question: ContinuedQuestion) -> None:
        """The user went on with `question` after its reply began: it heads the next question."""
        self.continued = question

    def speech_started(self, stream_t: float) -> None:
        """Speech began at `stream_t`: unless it is the speech that went on with a question, that question is dropped."""
        if self.continued is not None and abs(stream_t - self.continued.onset_stream_t) > 1e-6:
            self.continued = None  # what interrupted the reply was not speech after all

    def audio(self, tail: np.ndarray | None = None, tail_start_t: float = 0.0) -> np.ndarray:
        """The question so far: the one it goes on with, the windows kept, then `tail` (which
        begins at endpointer time `tail_start_t`)."""
        parts = list(self.windows)
        if self.continued is not None:
            parts.insert(0, self.continued.audio)
            if tail is not None:  # its pre-roll may repeat the end of the question it goes on with
                overlap = int(round((self.continued.audio_end_stream_t - tail_start_t) * SAMPLE_RATE))
                tail = tail[max(0, overlap) :]
        if tail is not None:
            parts.append(tail)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def take(self) -> int | None:
        """The question was asked: start afresh; returns the turn it went on with, if any."""
        continues = None if self.continued is None else self.continued.turn
        self.windows, self.continued = [], None
        return continues
