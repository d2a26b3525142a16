"""Answering one turn: the half of `Conversation` that runs a reply (split from engine.py to keep files short).

A reply streams the pipeline's events out as they come: text to the front door, audio through
the jitter buffer (`PlaybackBuffer`) to the sink. Between events it handles commands, drains
the input (barge-in in full duplex, dropped in half-duplex, buffered without turn detection)
and watches the devices; then it waits until the sink has played the reply, still listening.
When it ends, what was heard of it goes into the history and `ReplyDone` says how it went.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
import numpy as np

from omni_cli.audio.playback_buffer import PlaybackBuffer, faded_in
from omni_cli.audio.vad import SpeechStart
from omni_cli.conversation.events import (
    BargeIn,
    ConversationError,
    ConversationEvent,
    FullDuplexOn,
    QuestionCommitted,
    ReplyAudio,
    ReplyDone,
    ReplyEnd,
    ReplyPlaybackStarted,
    ReplyStarted,
    ReplyTextDelta,
    ReplyTruncated,
    SpeakerDropped,
)
from omni_cli.conversation.generation import Generation, ModelThread
from omni_cli.conversation.ports import AudioSink, EchoState, FrameSource, ReplySource
from omni_cli.conversation.reply import ReplyProgress, milliseconds_since
from omni_cli.conversation.turns import (
    ContinuedQuestion,
    ConversationSettings,
    GOOD_ERLE_DB,
    Listener,
    MicrophoneLost,
    SpeculativeReply,
    SpokenQuestion,
    UserTurn,
)
from omni_cli.errors import one_line
from omni_cli.pipeline import AudioChunk, Done, Event, History, HistoryTurn, QuestionTooLong, TextDelta, Units


# How long the conversation's thread waits for the model's next event before it listens again:
# the microphone's frames are taken within this of their arrival while the model works.
LISTEN_STEP_S = 0.01

# A reply's first 30 ms rise from silence: heard at once, but not as a click, even when the user
# was only pausing.
FADE_IN_S = 0.03


class Replying:
    """Runs the replies of a `Conversation`, whose state below it shares."""

    replies: ReplySource
    sink: AudioSink | None
    settings: ConversationSettings
    echo: EchoState | None
    clock: Callable[[], float]
    history: History
    turns: int
    device_problem: Callable[[], str | None] | None
    _stopping: bool
    _frames: FrameSource | None
    _spoken: SpokenQuestion
    _stream_origin: float
    _commands: queue.SimpleQueue[tuple[object, ...]]

    def _init_replying(self) -> None:
        self._buffer = PlaybackBuffer(getattr(self.replies, "chunk_units", None))
        self._reply: ReplyProgress | None = None
        # Orders play() (this thread) against cancel() (another): no audio is queued after a cancel.
        self._sink_lock = threading.Lock()
        self._full_duplex_said = False
        self._quiet_erle: float | None = None  # the canceller's ERLE when last measured without the user speaking
        self._kept: dict[int, tuple[HistoryTurn, ReplyProgress]] = {}  # turn → its history entry, for truncate()
        self._model_thread = ModelThread()

    # -- provided by Conversation ------------------------------------------------------

    def _emit(self, event: ConversationEvent) -> None:
        raise NotImplementedError

    def _handle_commands(self, wait: float = 0.0) -> None:
        raise NotImplementedError

    def _listening_while_replying(self) -> Listener | None:
        raise NotImplementedError

    def _drain_input_while_replying(self, timeout: float) -> None:
        raise NotImplementedError

    def _announce_barge_in(self, event: SpeechStart) -> None:
        raise NotImplementedError

    def _after_half_duplex_reply(self) -> None:
        raise NotImplementedError

    # -- state and cancel() -------------------------------------------------------------

    @property
    def replying(self) -> bool:
        """True while a turn is being answered (generated or played)."""
        return self._reply is not None

    @property
    def full_duplex(self) -> bool:
        """True while what the user says during a reply is listened to (barge-in)."""
        if self.settings.barge_in is None:
            return self.echo is not None and self.echo.converged
        return self.settings.barge_in

    def cancel(self) -> None:
        """Stop the reply in progress: its audio at once, generation at its next token (ReplyDone
        "cancelled"); ConversationError "no_reply" when none is. Any thread."""
        reply = self._reply
        if reply is None:
            self._commands.put(("no_reply",))
            return
        with self._sink_lock:
            reply.cancel_requested = True
            sink = self.sink
            if sink is not None and reply.played:
                sink.stop()
        self._commands.put(("wake",))

    def _start_reply(self, question: np.ndarray | str) -> Generation:
        """Answer `question` on the model thread, from the history as it is now (truncate() may
        change it on this thread while the prompt is being built there)."""
        history = self.history.copy()
        return self._model_thread.start(lambda stop: self.replies.respond(question, history, stop), self._should_stop)

    def _should_stop(self) -> bool:
        reply = self._reply
        return self._stopping or (reply is not None and (reply.cut is not None or reply.cancel_requested))

    # -- one turn ---------------------------------------------------------------------

    def _answer(self, question: np.ndarray | str, heard: UserTurn, speculation: SpeculativeReply | None = None) -> None:
        """Answer one user turn (16 kHz speech or typed text) that ended as `heard` says.

        `speculation`: the reply already started at the pause where the turn ended. A failure
        inside the model is one ConversationError and the conversation goes on.
        """
        self.turns += 1
        reply = self._reply = ReplyProgress(
            turn=self.turns,
            speech_end_t=heard.speech_end_t,
            spoken=self.sink is not None,
            voiced_end_stream_t=heard.voiced_end_stream_t,
            audio_end_stream_t=heard.audio_end_stream_t,
            speculative=speculation is not None,
        )
        if isinstance(question, str):
            self._emit(QuestionCommitted(self.clock(), reply.turn, heard, text=question))
        else:
            self._emit(QuestionCommitted(self.clock(), reply.turn, heard, audio=question))
        self._emit(ReplyStarted(self.clock(), reply.turn, reply.speculative))
        self._buffer.start_reply()
        source = speculation if speculation is not None else self._start_reply(question)
        try:
            self._generate(source, reply)
            if reply.cut is None and reply.error is None:
                self._play_out(reply)
        except MicrophoneLost as exc:  # the input went away: the turn ends here, and so does listening
            reply.error = str(exc)
            self._stop_sink(reply)  # what was heard of it, while the sink still knows
            raise
        except Exception as exc:  # noqa: BLE001 - any fault inside the model ends this turn only
            self._fail(reply, exc)
        except KeyboardInterrupt:
            # A second Ctrl-C while the turn was being cut: keep what there is, then end.
            self._stopping = True
            reply.cut = reply.cut or "cancelled"
            self._stop_sink(reply)
        finally:
            source.close()  # stopped, failed or over: the model thread is free for the next reply
            self._buffer.end_reply()
            self._finish(question, reply)
            self._reply = None
            if reply.heard_quietly:
                self._after_half_duplex_reply()

    def _generate(self, source: Generation | SpeculativeReply, reply: ReplyProgress) -> None:
        """Stream the reply out as the model thread makes it; meanwhile, and between its events,
        handle commands, listen for barge-in and watch the devices."""
        while not source.finished:
            event = source.get(LISTEN_STEP_S)
            if event is not None:
                self._take(event, reply)
            if reply.cut is None:
                self._play(reply, self._buffer.take())
            self._listen_while_replying(reply, timeout=0.0)
            self._check_devices(reply)
            self._handle_commands()
            if (self._stopping or reply.cancel_requested) and reply.cut is None:
                self._cut(reply, "cancelled")

    def _take(self, event: Event, reply: ReplyProgress) -> None:
        """One of the reply's events: its text to the front door, its audio to the jitter buffer."""
        reply.count(event)
        if isinstance(event, TextDelta):
            reply.add_text(event, self.clock())
            self._emit(ReplyTextDelta(self.clock(), reply.turn, event.text, reply.tokens))
        elif isinstance(event, Units):
            reply.units += len(event.units)
            self._buffer.on_units(event.t, len(event.units))
        elif isinstance(event, AudioChunk):
            if reply.cut is None and event.audio.size:
                if not reply.chunks:  # a soft start: a reply that turns out early is less abrupt
                    event = replace(event, audio=faded_in(event.audio, event.sample_rate, FADE_IN_S))
                # The sink resamples to its device as one stream: chunk by chunk would click at every boundary.
                reply.add_chunk(event)
                if self.sink is not None:
                    self._buffer.push(event.audio, event.sample_rate)
                self._emit(ReplyAudio(self.clock(), reply.turn, event.audio, event.sample_rate, event.index, reply.tokens))
        elif isinstance(event, Done):
            reply.take_done(event)

    def _play(self, reply: ReplyProgress, chunks: list[np.ndarray]) -> None:
        sink = self.sink
        if not chunks or sink is None or reply.cancel_requested:
            return
        if not reply.played:
            self._emit(ReplyPlaybackStarted(self.clock(), reply.turn, self.full_duplex and self._listening_while_replying() is not None))
        with self._sink_lock:
            if reply.cancel_requested:
                return
            if not reply.played:
                reply.playback_t = self.clock()
            reply.played = True
            for chunk in chunks:
                sink.play(chunk)

    def _play_out(self, reply: ReplyProgress) -> None:
        """Wait until the reply has been heard, still listening for barge-in; give up on a stuck sink."""
        sink = self.sink
        if sink is None:
            return
        self._play(reply, self._buffer.release())
        sink.finish()
        deadline = self.clock() + reply.audio_seconds + self.settings.playback_margin_s
        while sink.playing:
            if self._check_devices(reply):
                return
            self._handle_commands()
            if self._stopping or reply.cancel_requested:
                self._cut(reply, "cancelled")
                return
            self._listen_while_replying(reply, timeout=self.settings.poll_s)
            if reply.cut is not None:
                return
            if self.clock() > deadline:
                self._drop_sink(reply)
                return
        # The last block is still in the device buffer for its latency.
        if reply.played and sink.output_latency > 0:
            time.sleep(sink.output_latency)
        if not self.full_duplex:
            self._listen_while_replying(reply, timeout=0.0)

    def _check_devices(self, reply: ReplyProgress | None = None) -> bool:
        """As soon as the devices are gone: with an input (or between replies), raise MicrophoneLost;
        replying without one, drop the sink (True) and go on as text."""
        problem = self.device_problem() if self.device_problem is not None else None
        if problem is None:
            return False
        if self._frames is not None or reply is None:
            raise MicrophoneLost(problem)
        self.device_problem = None
        self._drop_sink(reply, problem.rstrip("."))
        return True

    def _drop_sink(self, reply: ReplyProgress, why: str = "the speaker stopped taking audio (unplugged or busy?)") -> None:
        self._stop_sink(reply)
        self._emit(SpeakerDropped(self.clock(), reply.turn, why))
        self.sink = None

    def _listen_while_replying(self, reply: ReplyProgress, timeout: float) -> None:
        """Drain the input during a reply: detect barge-in, or (half-duplex) drop what was heard."""
        listener = self._listening_while_replying()
        if listener is None:
            self._drain_input_while_replying(timeout)
            return
        if not self.full_duplex:
            listener.hear_quietly(timeout)
            reply.heard_quietly = True
            return
        if not self._full_duplex_said and self.settings.barge_in is None:
            self._full_duplex_said = True
            self._emit(FullDuplexOn(self.clock(), reply.turn, self._erle()))
        if reply.cut is None:
            start = listener.speech_start(timeout, self._echo_left(listener), self._goes_on(reply, listener.endpointer.time))
            if start is not None:
                self._barge_in(reply, listener, start)

    def _goes_on(self, reply: ReplyProgress, stream_t: float) -> bool:
        """True if speech beginning at endpointer time `stream_t` goes on with the reply's question (within rejoin_ms of its last word)."""
        end = reply.voiced_end_stream_t
        return end is not None and (stream_t - end) * 1000 <= self.settings.rejoin_ms

    def _echo_left(self, listener: Listener) -> bool:
        """True while the canceller is not yet removing the reply's echo well (ERLE under GOOD_ERLE_DB).

        The ERLE is taken from before the user began speaking: their voice in the cleaned microphone
        pulls the measurement down within a frame, which made a converged canceller look new at every
        barge-in and had the voice that AEC3 partly ducked discounted (the reply stopped 0.5 s after
        the user began, not 0.25, in 3 of 7 trials with the echo as loud as the voice).
        """
        if self.echo is None or getattr(self.echo, "bypassed", False):  # bypassed: no echo reaches the microphone
            return False
        endpointer = listener.endpointer
        if not (endpointer.in_speech or endpointer.onset is not None or endpointer.last_heard):
            self._quiet_erle = self.echo.erle_db
        return self._quiet_erle is None or self._quiet_erle < GOOD_ERLE_DB

    def _barge_in(self, reply: ReplyProgress, listener: Listener, event: SpeechStart) -> None:
        detected = self.clock()
        self._cut(reply, "interrupted")
        self._announce_barge_in(event)
        silent = self.sink.silent_time() if self.sink is not None and reply.played else None
        stopped = silent if silent is not None else self.clock()
        reply.barge_in_t = detected
        went_on = self._goes_on(reply, event.t)
        if went_on:
            reply.withdrawn_at = event.t  # the user went on with the question after a long pause
        self._emit(BargeIn(self.clock(), reply.turn, listener.clock_of(event.t), detected, stopped, self._stream_origin + event.t, went_on))

    def _cut(self, reply: ReplyProgress, why: ReplyEnd) -> None:
        """Cut playback now and make generation stop at its next token."""
        reply.cut = why
        self._stop_sink(reply)

    def _fail(self, reply: ReplyProgress, exc: Exception) -> None:
        """A fault inside the model or a device: one ConversationError; the conversation goes on."""
        reply.error = one_line(exc)
        self._stop_sink(reply)
        # A question too long for the context budget is the asker's to fix, not a fault in the model.
        code = "question_too_long" if isinstance(exc, QuestionTooLong) else "reply_failed"
        self._emit(ConversationError(self.clock(), code, reply.error, reply.turn))

    def _stop_sink(self, reply: ReplyProgress | None = None) -> None:
        """Cut playback; for `reply`, note first what of it was heard."""
        if self.sink is None:
            return
        if reply is not None and reply.played:
            self._note_heard(reply, cut=True)
        self.sink.stop()

    def _note_heard(self, reply: ReplyProgress, cut: bool) -> None:
        """When this reply was first heard, and (when `cut`) how much of it, while the sink still knows."""
        sink = self.sink
        if sink is None or not reply.played:
            return
        if reply.first_audio_t is None and sink.first_audio_time is not None:
            reply.first_audio_t = sink.first_audio_time + sink.output_latency
        if cut and reply.heard_seconds is None:
            reply.heard_seconds = round(min(sink.heard_seconds, reply.audio_seconds), 3)

    def _erle(self) -> float | None:
        erle = self.echo.erle_db if self.echo is not None else None
        return None if erle is None else round(erle, 1)

    # -- what is remembered -------------------------------------------------------------

    def _finish(self, question: np.ndarray | str, reply: ReplyProgress) -> None:
        """Keep what was heard of the reply in the history, then say how it went (ReplyDone)."""
        self._note_heard(reply, cut=False)
        heard_text = reply.heard_text()
        if reply.withdrawn_at is not None and not isinstance(question, str):
            # Not an answer to anything: the next turn asks this question again, with its rest.
            self._spoken.go_on_with(ContinuedQuestion(question, reply.audio_end_stream_t, reply.turn, reply.withdrawn_at, reply.voiced_end_stream_t))
        elif reply.error is None and heard_text:
            entry = HistoryTurn(user_speech=reply.user_speech, user_text=question if isinstance(question, str) else None, reply=heard_text)
            self.history.append(entry)
            self._keep(reply.turn, entry, reply)
        limits = [s for s in (reply.heard_seconds, reply.heard_cap) if s is not None]
        self._emit(
            ReplyDone(
                t=self.clock(),
                turn=reply.turn,
                reason=reply.end,
                text=reply.text,
                heard_text=heard_text,
                tokens=reply.tokens,
                units=reply.units,
                audio=reply.heard_audio(),
                audio_rate=reply.audio_rate,
                heard_seconds=min(limits) if limits else None,
                speech_end_t=reply.speech_end_t,
                first_text_t=reply.first_text_t,
                first_audio_t=reply.first_audio_t,
                first_text_ms=milliseconds_since(reply.speech_end_t, reply.first_text_t),
                latency_ms=milliseconds_since(reply.speech_end_t, reply.first_audio_t),
                speculative=reply.speculative,
                barge_in_t=reply.barge_in_t,
                withdrawn=reply.withdrawn_at is not None,
                echo_erle_db=self._erle() if reply.played else None,
                error=reply.error,
                playback_t=reply.playback_t,
            )
        )
        if reply.heard_cap is not None:
            self._emit(ReplyTruncated(self.clock(), reply.turn, reply.heard_cap, heard_text))

    def _keep(self, turn: int, entry: HistoryTurn, reply: ReplyProgress) -> None:
        """Remember how turn `turn`'s text maps to its audio while the history holds it (for truncate())."""
        self._kept[turn] = (entry, replace(reply, chunks=[], user_speech=None))
        held = {id(h) for h in self.history.turns}
        self._kept = {k: v for k, v in self._kept.items() if id(v[0]) in held}

    def _truncate(self, turn: int, heard_seconds: float) -> None:
        """truncate(): the history keeps only the text of the first `heard_seconds` of the reply's speech."""
        heard_seconds = max(0.0, heard_seconds)
        reply = self._reply
        if reply is not None and reply.turn == turn:  # settled when it is done
            reply.heard_cap = heard_seconds if reply.heard_cap is None else min(reply.heard_cap, heard_seconds)
            return
        kept = self._kept.get(turn)
        if kept is None:
            self._emit(ConversationError(self.clock(), "unknown_turn", f"turn {turn} is not in the history; truncate the reply of a turn still remembered.", turn))
            return
        entry, spoken = kept
        spoken.heard_cap = heard_seconds if spoken.heard_cap is None else min(spoken.heard_cap, heard_seconds)
        text = spoken.heard_text()
        if text:
            entry.reply = text
        else:  # nothing of it was heard: it answered nothing
            self.history.turns = [h for h in self.history.turns if h is not entry]
            del self._kept[turn]
        self._emit(ReplyTruncated(self.clock(), turn, spoken.heard_cap, text))

