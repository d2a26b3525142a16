"""The conversation: turn-taking between a person and the model, whatever the front door.

`Conversation` owns the turn-taking and nothing else. In: input frames with the time they were
heard (a `FrameSource`: the microphone, or a `FrameQueue` a client fills), typed questions and
commands from any thread. Out: typed events (`events.py`) to a callback, and reply audio to an
`AudioSink` (the speaker, or a client). `omni chat` (the terminal) and `omni serve` (the
network) are front doors to it; neither keeps a copy of it.

Turn-taking:
- Turn detection (a setting): the endpointer hears the user's turns (`Listener`), or, without
  it, the client commits them (`commit()`: the frames since the last commit or clear). In
  full duplex the turn may end after a shorter silence (`full_duplex_hangover_ms`): a guess
  the user takes back by going on (the rejoin below).
- Speculative start: at a short pause (`SpeechPause`) the reply is started — encoded,
  prefilled and generated into a buffer — while the hang-over runs. If the turn ends at that
  pause, the buffered reply goes out at once; if the user speaks on, it is dropped and the
  continued speech stays part of the same turn.
- Replying (`replying.py`): text and audio go out as the pipeline yields them (audio through a
  small jitter buffer). Between events, commands are handled and the input is drained: in full
  duplex, speech (`barge_in_ms` of it) stops the reply (barge-in) and becomes the next turn — or,
  when it began within `rejoin_ms` of the question's last word (one frame is enough then), goes on
  with that question (the reply is withdrawn, both parts are asked as one; if that voice never
  becomes speech, the question is asked again). In half-duplex (no echo canceller, or one
  that has not converged yet) what is heard while replying never interrupts: an utterance the
  user goes on with past the reply (and its echo's tail) is answered after it, whole; one that
  ended during the reply is dropped (it may have been the reply's echo).
- Long speech: the model hears 30 s at a time; at each 30 s the utterance is kept and listening
  goes on: the windows that follow are appended to the same question (up to `max_question_windows`).
- Memory: finished turns (speech embeddings or text, and the reply as far as it was heard) are
  kept in a `History` within the pipeline's context budget and passed back with each question.

Threads: `run()` loops on one thread until stop(), listening; replies are generated on the
conversation's model thread (`generation.ModelThread`) and their events taken between frames,
so a model step never holds up the microphone. Each reply gets a copy of the history as it was
when the reply began. ask_text, commit, clear, cancel, truncate, set_turn_detection, set_duplex and
stop may be called from any thread (stop() also from a signal handler). No lock is held while the
model works, so respond() may block (e.g. while the model serves another conversation).

Timings (time.monotonic()): a spoken turn's `speech_end_t` is the end of its last voiced frame
(the true end of speech, put on the clock with the frames' times); a reply's `latency_ms` runs
from there to its first sample out of the sink.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.audio.vad import Endpointer, EndpointerConfig, SpeechEnd, SpeechPause, SpeechStart
from omni_cli.audio.vad import Event as VadEvent
from omni_cli.conversation.events import (
    ConversationError,
    ConversationEvent,
    DraftDropped,
    Listening,
    SpeechStarted,
    SpeechStopped,
    StillListening,
)
from omni_cli.conversation.frames import InputBuffer
from omni_cli.conversation.ports import AudioSink, EchoState, FrameSource, ReplySource
from omni_cli.conversation.replying import Replying
from omni_cli.conversation.turns import ConversationSettings, Listener, SpeculativeReply, SpokenQuestion, UserTurn
from omni_cli.pipeline import History

# At the end, how long to wait for the model thread's last step (a stopped reply ends at its next
# token), so the process does not exit in the middle of one.
STOP_WAIT_S = 5.0


class Conversation(Replying):
    """One conversation's turn-taking: frames, questions and commands in; events and reply audio out."""

    def __init__(
        self,
        replies: ReplySource,
        on_event: Callable[[ConversationEvent], None],
        frames: FrameSource | None = None,
        sink: AudioSink | None = None,
        settings: ConversationSettings | None = None,
        echo: EchoState | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`frames`: the input (None: typed questions only); `sink`: where reply audio goes (None:
        replies are text only); `echo`: the echo canceller whose convergence turns barge-in on."""
        self.replies = replies
        self.on_event = on_event
        self.sink = sink
        self.settings = settings or ConversationSettings()
        self.echo = echo
        self.clock = clock
        self.history = History(budget=replies.context_budget)
        self.turns = 0
        self.drafts_dropped = 0  # speculative replies thrown away because the user spoke on
        # Set by a front door: why the devices went away, else None. Called between tokens and
        # frames, so it must be cheap (audio.watch.SoundWatch.problem).
        self.device_problem: Callable[[], str | None] | None = None
        self._frames = frames
        self._listener: Listener | None = None
        self._input = InputBuffer()  # turn detection off: what the client will commit
        self._stream_origin = 0.0  # stream time when the current turn detection began
        self._input_t = 0.0  # turn detection off: stream time since then
        self._heard_first_frame = False
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._deferred: deque[Callable[[], None]] = deque()  # work waiting for no reply to be in progress
        self._stopping = False
        self._speculation: SpeculativeReply | None = None
        self._spoken = SpokenQuestion()
        self._barge_in_onset: float | None = None  # stream time of the speech a barge-in announced
        # After a half-duplex reply: until this stream time, voice may be its echo (an utterance
        # that began during the reply counts only if its voice goes on past it); None: no such reply.
        self._echo_until: float | None = None
        self._reply_end_stream_t = 0.0
        self._closed = False
        self._init_replying()
        self._use_turn_detection(self.settings.turn_detection)

    # -- what other threads call ------------------------------------------------------------

    def ask_text(self, text: str) -> None:
        """A typed question: answered once no reply is in progress (latency counts from now)."""
        self._commands.put(("text", text, self.clock()))

    def commit(self) -> None:
        """The client ends its turn. Without turn detection: the frames since the last commit or
        clear are the question. With it: the utterance in progress ends now."""
        flush = getattr(self._frames, "flush", None)
        if flush is not None and self._listener is None:
            flush()  # the end of the turn: a partial frame is its last
        self._commands.put(("commit", self.clock()))

    def clear(self) -> None:
        """Forget what was heard of the turn in progress (the frames since the last commit)."""
        self._commands.put(("clear",))

    def truncate(self, turn: int, heard_seconds: float) -> None:
        """The client played only `heard_seconds` of turn `turn`'s reply: the history keeps the text
        of that much (ReplyTruncated; ConversationError "unknown_turn" if it holds no such turn)."""
        self._commands.put(("truncate", turn, heard_seconds))

    def set_turn_detection(self, config: EndpointerConfig | None) -> None:
        """Switch turn detection (None: client-committed turns) once no reply is in progress."""
        self._commands.put(("turn_detection", config))

    def set_duplex(self, barge_in: bool | None, early_end_ms: int | None = None) -> None:
        """Switch `ConversationSettings.barge_in` and `full_duplex_hangover_ms` from the next frame on, mid-reply too."""
        self._commands.put(("duplex", barge_in, early_end_ms))

    def stop(self) -> None:
        """End the conversation soon: the reply in progress is cut (cancelled), then run() returns.

        Only sets a flag and wakes the loop, so a signal handler may call it.
        """
        self._stopping = True
        self._commands.put(("wake",))

    # -- state ------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once stop() was called (or a KeyboardInterrupt ended run())."""
        return self._stopping

    @property
    def hears_input(self) -> bool:
        """True while there is an input frame source."""
        return self._frames is not None

    @property
    def listener(self) -> Listener | None:
        """The input heard through turn detection; None without either."""
        return self._listener

    @property
    def turn_detection_problem(self) -> str | None:
        """Why turn detection runs without its confirming speech model (one line), else None."""
        return None if self._listener is None else self._listener.endpointer.model_problem

    def set_input(self, frames: FrameSource | None) -> None:
        """Listen to another frame source (None: typed questions only); only while run() is not running."""
        self._frames = frames
        self._use_turn_detection(self.settings.turn_detection)

    def close(self) -> None:
        """Drop a draft in progress and silence the sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._discard_speculation()
        self._stop_sink()

    # -- the loop ---------------------------------------------------------------------

    def run(self, until_idle: bool = False) -> None:
        """Listen and answer until stop(). `until_idle`: return as soon as nothing queued is left
        (for a caller feeding typed questions on this thread). Raises MicrophoneLost if the input
        stops delivering; a KeyboardInterrupt (a second Ctrl-C) counts as stop()."""
        try:
            if self._listener is not None:
                self._listener.restart_watch()
            while not self._stopping:
                if self._frames is not None:
                    self._check_devices()
                self._handle_commands()
                if self._stopping:
                    break
                if self._deferred:
                    self._discard_speculation()  # one generation at a time
                    self._deferred.popleft()()
                    continue
                if until_idle and self._commands.empty():
                    return
                self._listen_once()
        except KeyboardInterrupt:
            self._stopping = True
        finally:
            self._discard_speculation()
            if self._stopping:
                self._model_thread.wait_idle(STOP_WAIT_S)

    def _listen_once(self) -> None:
        """One step of listening: a frame (or the events held during a reply), or a wait for a command."""
        listener = self._listener
        if listener is not None:
            short, config = self.settings.full_duplex_hangover_ms, listener.endpointer.config
            listener.endpointer.set_hangover_ms(min(short, config.hangover_ms) if short is not None and self.full_duplex else config.hangover_ms)
            for event in listener.next_events():
                self._heard(event)
                if self._stopping:
                    break
            self._follow_speculation()
            self._answer_what_was_left()
        elif self._frames is not None:
            self._read_input(self.settings.poll_s)
        else:
            self._handle_commands(wait=self.settings.poll_s)

    def _handle_commands(self, wait: float = 0.0) -> None:
        """Everything queued by other threads (waiting up to `wait` for the first)."""
        block = wait
        while True:
            try:
                command = self._commands.get(timeout=block) if block > 0 else self._commands.get_nowait()
            except queue.Empty:
                return
            block = 0.0
            self._handle(command)

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "text":
            text, asked_t = command[1].strip(), command[2]
            if not text:
                self._emit(ConversationError(self.clock(), "empty_input", "the typed question is empty; type something to ask."))
                return
            self._deferred.append(lambda: self._answer(text, UserTurn(end_t=asked_t, speech_end_t=asked_t)))
        elif kind == "commit":
            self._commit(command[1])
        elif kind == "clear":
            self._clear()
        elif kind == "truncate":
            self._truncate(command[1], command[2])
        elif kind == "no_reply":
            self._emit(ConversationError(self.clock(), "no_reply", "there is no reply to cancel."))
        elif kind == "turn_detection":
            config = command[1]
            self._deferred.append(lambda: self._switch_turn_detection(config))
        elif kind == "duplex":
            self.settings = replace(self.settings, barge_in=command[1], full_duplex_hangover_ms=command[2])

    def _emit(self, event: ConversationEvent) -> None:
        self.on_event(event)

    # -- turn detection ---------------------------------------------------------------

    def _use_turn_detection(self, config: EndpointerConfig | None) -> None:
        """Hear turns with a fresh endpointer on `config` (None: client-committed turns)."""
        self._stream_origin = self.stream_time
        self._input_t = 0.0
        self._input.clear()
        self._spoken = SpokenQuestion()
        self._listener = None
        if config is not None and self._frames is not None:
            self._listener = Listener(self._frames, Endpointer(config), self.settings, self.clock, self._first_frame)

    def _switch_turn_detection(self, config: EndpointerConfig | None) -> None:
        self.settings = replace(self.settings, turn_detection=config)
        self._use_turn_detection(config)

    @property
    def stream_time(self) -> float:
        """Seconds of input heard so far."""
        listener = self._listener
        return self._stream_origin + (listener.endpointer.time if listener is not None else self._input_t)

    def _first_frame(self, t: float) -> None:
        if not self._heard_first_frame:
            self._heard_first_frame = True
            self._emit(Listening(t, first=True))

    def _heard(self, event: VadEvent) -> None:
        """One endpointer event while listening."""
        listener = self._listener
        assert listener is not None
        if isinstance(event, SpeechStart):
            announced = self._barge_in_onset is not None and abs(event.t - self._barge_in_onset) < 1e-6
            self._barge_in_onset = None
            onset = listener.clock_of(event.t)
            self._emit(SpeechStarted(self.clock(), onset, self._stream_origin + event.t, continued=announced or bool(self._spoken.windows)))
            self._spoken.speech_started(event.t)
        elif isinstance(event, SpeechPause):
            if self.settings.speculate and self._speculation is None:
                question = self._spoken.audio(event.audio, event.audio_start_t)
                self._speculation = SpeculativeReply(self._start_reply(question), question, event)
        elif isinstance(event, SpeechEnd):
            if self._heard_echo(event):
                return
            if event.forced and len(self._spoken.windows) + 1 < self.settings.max_question_windows:
                self._keep_window(event)
                return
            spec, self._speculation = self._speculation, None
            # The turn ended at the pause the speculative reply started from: it is this turn's reply.
            committed = spec is not None and not event.forced and abs(spec.voiced_end_t - event.voiced_end_t) < 1e-6
            if spec is not None and not committed:
                self._discarded(spec)
            if committed and spec is not None:
                self._answer_turn(spec.question, len(self._spoken.windows) + 1, event.t, event.voiced_end_t, spec.pause.t, spec, event.speech_end_t)
            else:
                question = self._spoken.audio(event.audio, event.audio_start_t)
                self._answer_turn(question, len(self._spoken.windows) + 1, event.t, event.voiced_end_t, event.t, speech_end_stream_t=event.speech_end_t)

    def _answer_turn(
        self,
        question: np.ndarray,
        windows: int,
        end_stream_t: float,
        voiced_end_stream_t: float,
        audio_end_stream_t: float,
        speculation: SpeculativeReply | None = None,
        speech_end_stream_t: float | None = None,
    ) -> None:
        """Answer the spoken turn (spanning `windows` 30 s windows) that ended at endpointer time
        `end_stream_t`, its last voiced frame at `voiced_end_stream_t` (its speech, to the sample, at
        `speech_end_stream_t`), its audio at `audio_end_stream_t`; then listen again."""
        listener = self._listener
        assert listener is not None
        speech_end = voiced_end_stream_t if speech_end_stream_t is None else speech_end_stream_t
        turn = UserTurn(
            end_t=listener.clock_of(end_stream_t),
            speech_end_t=listener.clock_of(speech_end),
            end_of_turn_ms=round((end_stream_t - speech_end) * 1000, 1),
            windows=windows,
            voiced_end_stream_t=voiced_end_stream_t,
            audio_end_stream_t=audio_end_stream_t,
            continues=self._spoken.take(),
        )
        self._emit(SpeechStopped(self.clock(), turn.speech_end_t, self._stream_origin + speech_end))
        self._answer(question, turn, speculation)
        listener.restart_watch()
        if not self._stopping:
            self._emit(Listening(self.clock()))

    def _keep_window(self, event: SpeechEnd) -> None:
        """The utterance reached the model's 30 s window while speech went on: keep it and listen on."""
        self._discard_speculation()
        self._spoken.keep_window(event.audio, event.t)
        self._emit(StillListening(self.clock(), self._spoken.seconds, len(self._spoken.windows)))

    def _answer_what_was_left(self) -> None:
        """Once the user is quiet, answer a question left waiting: one cut at the model's 30 s window
        (after the hang-over), or one whose reply was withdrawn for voice that never became speech (a
        cough, a click: the endpointer dropped its onset), asked again as it was rather than lost."""
        listener, spoken = self._listener, self._spoken
        if listener is None or listener.held or listener.endpointer.in_speech or listener.endpointer.onset is not None:
            return
        now, continued = listener.endpointer.time, spoken.continued
        if spoken.windows:
            end = spoken.window_end_stream_t
            if now - end >= listener.endpointer.config.hangover_ms / 1000:
                self._answer_turn(spoken.audio(), len(spoken.windows), now, end, end)
        elif continued is not None:
            end = continued.audio_end_stream_t
            self._answer_turn(spoken.audio(), 1, now, end if continued.voiced_end_stream_t is None else continued.voiced_end_stream_t, end)

    def _follow_speculation(self) -> None:
        """While the hang-over runs: drop the speculative reply if the user went on, else let it work one step."""
        spec, listener = self._speculation, self._listener
        if spec is None or listener is None:
            return
        voiced_end = listener.endpointer.voiced_end_t
        if voiced_end is None or voiced_end > spec.voiced_end_t + 1e-6:
            self._speculation = None
            self._discarded(spec)
            return
        spec.advance()

    def _discarded(self, spec: SpeculativeReply) -> None:
        spec.close()
        self.drafts_dropped += 1
        self._emit(DraftDropped(self.clock(), round((spec.pause.t - spec.voiced_end_t) * 1000, 1), spec.tokens))

    def _discard_speculation(self) -> None:
        spec, self._speculation = self._speculation, None
        if spec is not None:
            spec.close()

    # -- client-committed turns -------------------------------------------------------

    def _read_input(self, timeout: float) -> None:
        """Turn detection off: what the client sends, into the input buffer (waiting up to `timeout` for the first frame)."""
        assert self._frames is not None
        block = timeout
        while (frame := self._frames.read(timeout=block)) is not None:
            block = 0.0
            now = self.clock()
            self._first_frame(now)
            self._input_t += frame.size / SAMPLE_RATE
            end_t = self._frames.frame_end_t
            self._input.append(frame, now if end_t is None else end_t, self.stream_time)

    def _commit(self, asked_t: float) -> None:
        """commit(): without turn detection, the input buffer is the question (taken now, answered
        once no reply is in progress); with it, the utterance in progress ends when no reply is."""
        if self._listener is not None:
            self._deferred.append(self._commit_speech)
            return
        if self._frames is not None:
            self._read_input(0.0)  # frames pushed before commit() was called belong to this turn
        audio = self._input.take()
        if audio is None:
            self._emit(ConversationError(self.clock(), "empty_input", "nothing to commit: no audio came since the last commit or clear."))
            return
        end_t = self._input.end_t if self._input.end_t is not None else asked_t
        heard = UserTurn(
            end_t=asked_t,
            speech_end_t=end_t,
            windows=max(1, math.ceil(audio.size / (30 * SAMPLE_RATE))),
            audio_end_stream_t=self._input.end_stream_t,
        )
        self._deferred.append(lambda: self._answer(audio, heard))

    def _commit_speech(self) -> None:
        listener = self._listener
        if listener is None:  # turn detection was switched off meanwhile
            self._commit(self.clock())
            return
        endpointer, spoken = listener.endpointer, self._spoken
        if endpointer.in_speech:
            self._discard_speculation()
            (end,) = [e for e in endpointer.flush() if isinstance(e, SpeechEnd)]
            question = spoken.audio(end.audio, end.audio_start_t)
            self._answer_turn(question, len(spoken.windows) + 1, end.t, end.voiced_end_t, end.t, speech_end_stream_t=end.speech_end_t)
        elif spoken.windows:
            self._answer_turn(spoken.audio(), len(spoken.windows), endpointer.time, spoken.window_end_stream_t, spoken.window_end_stream_t)
        else:
            self._emit(ConversationError(self.clock(), "empty_input", "nothing to commit: no speech was heard since the last turn."))

    def _clear(self) -> None:
        """clear(): forget the turn in progress."""
        self._discard_speculation()
        self._spoken = SpokenQuestion()
        if self._listener is not None:
            self._listener.endpointer.reset()
        elif self._frames is not None:
            self._read_input(0.0)
            self._frames.clear()  # and a partial frame
        self._input.clear()

    # -- used by Replying -------------------------------------------------------------

    def _listening_while_replying(self) -> Listener | None:
        return self._listener

    def _drain_input_while_replying(self, timeout: float) -> None:
        """No turn detection: frames sent during a reply are the next turn's; without input, wait for commands."""
        if self._frames is not None:
            self._read_input(timeout)
        elif timeout > 0:
            self._handle_commands(wait=timeout)

    def _after_half_duplex_reply(self) -> None:
        """What the mic heard during a half-duplex reply: an utterance still going on is kept (the
        user spoke over the reply; it is answered now), the rest was dropped (it may be echo)."""
        listener = self._listener
        if listener is not None:
            self._reply_end_stream_t = listener.endpointer.time
            self._echo_until = listener.keep_after_reply()

    def _heard_echo(self, event: SpeechEnd) -> bool:
        """An utterance that began during a half-duplex reply and whose voice ended within the echo's
        tail: it may have been the reply's own voice, so it is no question (True)."""
        until, self._echo_until = self._echo_until, None
        if until is None or event.audio_start_t >= self._reply_end_stream_t or event.voiced_end_t > until:
            return False
        self._discard_speculation()
        self._spoken = SpokenQuestion()
        return True

    def _announce_barge_in(self, event: SpeechStart) -> None:
        """The speech that stopped a reply is announced now; the endpointer's own start for it later is `continued`."""
        listener = self._listener
        assert listener is not None
        self._barge_in_onset = event.t
        self._emit(SpeechStarted(self.clock(), listener.clock_of(event.t), self._stream_origin + event.t))
