"""`omni chat`: the conversation loop — microphone → echo canceller → endpointer → pipeline → player and screen.

`ChatSession` owns the turn-taking and nothing else: the model (a `ReplySource`:
`respond(audio | text, history, should_stop)`, its `sample_rate` and `context_budget`), the
microphone (frames from `read()`), the endpointer, the player, the echo canceller and the view
are passed in, so tests drive it with fakes and `chat.devices.run_chat` with real devices. Each
turn is saved as it happens by `transcript.SessionRecorder`. The parts that hear the user's
turns (`Listener`, `SpokenQuestion`, `SpeculativeReply`) are in `conversation/turns.py`.

Turn-taking:
- Listening: mic frames (cleaned of the speaker's echo in the mic's callback) go to the
  endpointer (`Listener`); a SpeechEnd is the user's turn.
- Speculative start: at a short pause (`SpeechPause`) the reply is started — encoded,
  prefilled and generated into a buffer — while the hang-over runs. If the turn ends at that
  pause, the buffered reply is shown and played at once; if the user speaks on, it is thrown
  away and the continued speech stays part of the same turn.
- Replying: text goes to the view and audio to the player as the pipeline yields it, through
  a small jitter buffer (`PlaybackBuffer`: playback starts once the audio held covers the
  measured time to the next chunk). Between events the microphone queue is drained: in full
  duplex, frames still go to the endpointer and speech (`barge_in_ms` of it) stops playback
  and generation at once (barge-in); the interrupting utterance becomes the next turn — or,
  when it began within `rejoin_ms` of the question's last word, goes on with that question:
  the reply is withdrawn and both parts are asked as one. In half-duplex (no echo
  canceller, or one that has not converged yet: its first seconds of reply speech), frames heard
  while replying are dropped and the endpointer is reset afterwards.
- Long speech: the model hears 30 s at a time; at each 30 s the endpointer ends the utterance,
  the screen says so and listening goes on: the windows that follow are appended to the same
  question (up to `max_question_windows`).
- Multi-turn memory: finished turns (speech embeddings, on the CPU, or typed text, and the
  reply text) are kept in a `History` bounded by the pipeline's context budget and passed
  back with each question; the pipeline picks the newest ones that fit the prompt.
- Stopping: `request_stop()` (Ctrl-C, see `sigint_ends_session`) cuts the reply in progress,
  records it, and ends the loop.

Timings (all time.monotonic()): a spoken turn's `speech_end_t` is the end of the last voiced
frame (the true end of speech, put on the clock with the mic's frame times), and `latency_ms` runs
from there to the first reply sample out of the speaker (the first block handed to the device
plus its output latency); the end-of-turn delay is recorded beside it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.audio.playback_buffer import PlaybackBuffer
from omni_cli.audio.vad import Endpointer, SpeechEnd, SpeechPause, SpeechStart
from omni_cli.audio.vad import Event as VadEvent
from omni_cli.chat.view import ChatView
from omni_cli.errors import one_line
from omni_cli.pipeline import AudioChunk, Done, Event, History, HistoryTurn, TextDelta, Units
from omni_cli.chat.transcript import ReplyRecord, SessionRecorder, milliseconds_since
from omni_cli.conversation.turns import (
    ChatSettings,
    ContinuedQuestion,
    FrameSource,
    Listener,
    MicrophoneLost,
    SpeculativeReply,
    SpokenQuestion,
    UserTurn,
)


class ReplySource(Protocol):
    """What the session needs from the model: `SpeechToSpeech` or a test double.

    Optional: `chunk_units` (units per audio chunk after the first), for the jitter buffer.
    """

    @property
    def sample_rate(self) -> int | None:
        """The reply audio's rate (the player is opened at it); None when replies are text only."""

    @property
    def context_budget(self) -> int:
        """Prompt positions for history, question and reply: turns beyond it are not kept."""

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]: ...


class AudioSink(Protocol):
    """What the session needs from the speaker: `Player` or a test double."""

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
    """What the session reads from the echo canceller: `EchoCanceller` or a test double."""

    @property
    def converged(self) -> bool: ...

    @property
    def erle_db(self) -> float | None: ...


@dataclass
class ReplyProgress:
    """What one reply has produced so far, and how it ended."""

    turn: int
    speech_end_t: float  # timings are measured from here (see UserTurn)
    text: str = ""
    units: int = 0
    tokens: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    audio_rate: int = SAMPLE_RATE
    first_text_t: float | None = None
    voiced_end_stream_t: float | None = None  # see UserTurn
    audio_end_stream_t: float = 0.0
    played: bool = False  # some of its audio was handed to the player
    first_audio_t: float | None = None  # the first reply sample out of the speaker
    heard_seconds: float | None = None  # how much was played, when it did not play to its end
    stopped: str = ""
    interrupted: bool = False
    barge_in_t: float | None = None
    withdrawn_at: float | None = None  # endpointer time of the speech that went on with the question
    error: str | None = None
    speculative: bool = False
    user_speech: Any = None  # the turn's speech embeddings from Done, kept in the history

    @property
    def audio_seconds(self) -> float:
        return sum(c.size for c in self.chunks) / self.audio_rate

    def count(self, event: Event) -> None:
        """Keep the token count up to date from any event (Done may never come)."""
        self.tokens = max(self.tokens, getattr(event, "tokens", 0))

    def take_done(self, done: Done) -> None:
        """The pipeline's last word: the whole text and how generation ended."""
        self.text, self.units, self.tokens, self.stopped = done.text, len(done.units), done.tokens, done.stopped
        self.user_speech = done.user_speech


class ChatSession:
    """One conversation: turn-taking between a person and the pipeline, saved as it goes."""

    # Set by run_chat: why the sound system went away under the open devices, else None. Called
    # between tokens and mic frames, so it must be cheap (audio.watch.SoundWatch.problem).
    sound_problem: Callable[[], str | None] | None = None

    def __init__(
        self,
        pipeline: ReplySource,
        view: ChatView,
        recorder: SessionRecorder,
        mic: FrameSource | None = None,
        endpointer: Endpointer | None = None,
        player: AudioSink | None = None,
        settings: ChatSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        echo: EchoState | None = None,
    ) -> None:
        if mic is not None and endpointer is None:
            raise ValueError("a microphone needs an endpointer")
        self.pipeline = pipeline
        self.view = view
        self.recorder = recorder
        self.player = player
        self.settings = settings or ChatSettings()
        self.clock = clock
        self.echo = echo
        self.listener: Listener | None = None
        if mic is not None and endpointer is not None:
            # Frames flow from the first one on: from there, speech is heard.
            self.listener = Listener(mic, endpointer, self.settings, clock, lambda t: recorder.event("listening", t=t))
        self.history = History(budget=pipeline.context_budget)
        self.buffer = PlaybackBuffer(getattr(pipeline, "chunk_units", None))
        self.turns = 0
        self.stop_requested = False
        self.waiting_for_input = False  # True while blocked on typed input: Ctrl-C must interrupt the read
        self.discarded = 0  # speculative replies thrown away because the user spoke on
        self._reply: ReplyProgress | None = None
        self._speculation: SpeculativeReply | None = None
        self._spoken = SpokenQuestion()
        self._full_duplex_said = False
        self._closed = False

    # -- loops ------------------------------------------------------------------------

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

    def request_stop(self) -> None:
        """End the session soon: the reply in progress is cut and recorded, then the loop returns."""
        self.stop_requested = True

    def run_voice(self) -> None:
        """Listen and answer until request_stop(); raises MicrophoneLost if the mic stops delivering."""
        listener = self.listener
        assert listener is not None
        self.view.status("listening", "speak; Ctrl-C ends the session")
        listener.restart_watch()
        try:
            while not self.stop_requested:
                self._check_sound()
                working = self._speculation is not None and not self._speculation.done
                for event in listener.next_events(timeout=0.0 if working else None):
                    self._heard(event)
                    if self.stop_requested:
                        break
                self._follow_speculation()
                self._answer_windows_if_quiet()
        except KeyboardInterrupt:
            self.stop_requested = True
        finally:
            self._discard_speculation()

    def _heard(self, event: VadEvent) -> None:
        """One endpointer event while listening."""
        listener = self.listener
        assert listener is not None
        if isinstance(event, SpeechStart):
            self.view.status("hearing")
            self._spoken.speech_started(event.t)
        elif isinstance(event, SpeechPause):
            if self.settings.speculate and self._speculation is None:
                question = self._spoken.audio(event.audio, event.audio_start_t)
                self._speculation = SpeculativeReply(self.pipeline.respond(question, self.history, self._should_stop), question, event)
        elif isinstance(event, SpeechEnd):
            if event.forced and len(self._spoken.windows) + 1 < self.settings.max_question_windows:
                self._keep_window(event)
                return
            spec, self._speculation = self._speculation, None
            # The turn ended at the pause the speculative reply started from: it is this turn's reply.
            committed = spec is not None and not event.forced and abs(spec.voiced_end_t - event.voiced_end_t) < 1e-6
            if spec is not None and not committed:
                self._discarded(spec)
            if committed and spec is not None:
                self._answer_turn(spec.question, len(self._spoken.windows) + 1, event.t, event.voiced_end_t, spec.pause.t, spec)
            else:
                question = self._spoken.audio(event.audio, event.audio_start_t)
                self._answer_turn(question, len(self._spoken.windows) + 1, event.t, event.voiced_end_t, event.t)

    def _answer_turn(
        self,
        question: np.ndarray,
        windows: int,
        end_stream_t: float,
        voiced_end_stream_t: float,
        audio_end_stream_t: float,
        speculation: SpeculativeReply | None = None,
    ) -> None:
        """Answer the spoken turn (spanning `windows` 30 s windows) that ended at endpointer time
        `end_stream_t`, its speech at `voiced_end_stream_t`, its audio at `audio_end_stream_t`; then listen again."""
        listener = self.listener
        assert listener is not None
        turn = UserTurn(
            end_t=listener.clock_of(end_stream_t),
            speech_end_t=listener.clock_of(voiced_end_stream_t),
            end_of_turn_ms=round((end_stream_t - voiced_end_stream_t) * 1000, 1),
            windows=windows,
            voiced_end_stream_t=voiced_end_stream_t,
            audio_end_stream_t=audio_end_stream_t,
            continues=self._spoken.take(),
        )
        self.answer(question, turn, speculation)
        listener.restart_watch()
        if not self.stop_requested:
            self.view.status("listening")

    def _keep_window(self, event: SpeechEnd) -> None:
        """The utterance reached the model's 30 s window while speech went on: keep it and listen on."""
        self._discard_speculation()
        self._spoken.keep_window(event.audio, event.t)
        seconds = self._spoken.seconds
        self.view.note(f"still listening: your turn passed {seconds:.0f} s (the model hears 30 s at a time); what you say next is added to it.")
        self.view.status("hearing", f"{seconds:.0f} s so far")
        self.recorder.event("long_speech", seconds=round(seconds, 2), windows=len(self._spoken.windows))

    def _answer_windows_if_quiet(self) -> None:
        """A question cut at 30 s whose speaker then fell silent: answer what was said."""
        listener = self.listener
        spoken = self._spoken
        if not spoken.windows or listener is None or listener.endpointer.in_speech:
            return
        endpointer = listener.endpointer
        if endpointer.time - spoken.window_end_stream_t < endpointer.config.hangover_ms / 1000:
            return
        self._answer_turn(spoken.audio(), len(spoken.windows), endpointer.time, spoken.window_end_stream_t, spoken.window_end_stream_t)

    def _follow_speculation(self) -> None:
        """While the hang-over runs: drop the speculative reply if the user went on, else let it work one step."""
        spec, listener = self._speculation, self.listener
        if spec is None or listener is None:
            return
        voiced_end = listener.endpointer.voiced_end_t
        if voiced_end is None or voiced_end > spec.voiced_end_t + 1e-6:
            self._speculation = None
            self._discarded(spec)
            return
        spec.advance()

    def _discarded(self, spec: SpeculativeReply) -> None:
        spec.discard()
        self.discarded += 1
        self.recorder.event("speculative_reply_dropped", after_pause_ms=round((spec.pause.t - spec.voiced_end_t) * 1000, 1), tokens=spec.tokens)

    def _discard_speculation(self) -> None:
        spec, self._speculation = self._speculation, None
        if spec is not None:
            spec.discard()

    def run_text(self, read_line: Callable[[], str | None]) -> None:
        """Answer typed questions from `read_line` (None = end of input) until it ends or request_stop()."""
        try:
            while not self.stop_requested:
                self.view.status("typing", "type a question; Ctrl-C or Ctrl-D ends the session")
                self.waiting_for_input = True
                try:
                    line = read_line()
                finally:
                    self.waiting_for_input = False
                if line is None:
                    break
                if line.strip():
                    now = self.clock()
                    self.answer(line.strip(), UserTurn(end_t=now, speech_end_t=now))
        except KeyboardInterrupt:
            self.stop_requested = True

    def close(self, reason: str, **stats: Any) -> None:
        """Record the end of the session (with device `stats` such as overflow counts) and close the transcript (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._discard_speculation()
        self._stop_player()
        self.recorder.event("end", turns=self.turns, reason=reason, speculative_replies_dropped=self.discarded, **stats)
        self.recorder.close()

    # -- one turn ---------------------------------------------------------------------

    def answer(self, question: np.ndarray | str, heard: UserTurn, speculation: SpeculativeReply | None = None) -> ReplyProgress:
        """Answer one user turn (16 kHz speech or typed text) that ended as `heard` says.

        `speculation`: the reply already started at the pause where the turn ended. The user
        turn is saved before the model runs (or goes on); the reply is saved when it has been
        played, interrupted, or has failed (a failure is shown in one line and the session goes on).
        """
        self.turns += 1
        reply = self._reply = ReplyProgress(
            turn=self.turns,
            speech_end_t=heard.speech_end_t,
            voiced_end_stream_t=heard.voiced_end_stream_t,
            audio_end_stream_t=heard.audio_end_stream_t,
            speculative=speculation is not None,
        )
        self.recorder.question(
            reply.turn,
            heard.end_t,
            question,
            speech_end_t=None if isinstance(question, str) else heard.speech_end_t,
            end_of_turn_ms=heard.end_of_turn_ms,
            windows=heard.windows if heard.windows > 1 else None,
            continues=heard.continues,
        )
        if isinstance(question, str):
            self.view.user_typed(reply.turn, question)
        else:
            self.view.user_spoken(reply.turn, question.size / SAMPLE_RATE)
        self.view.status("thinking")
        self.buffer.start_reply()
        try:
            events = speculation.replay() if speculation is not None else self.pipeline.respond(question, self.history, self._should_stop)
            self._generate(events, reply)
            if not reply.interrupted and reply.error is None:
                self._play_out(reply)
        except MicrophoneLost as exc:  # the sound system went away: the turn ends here, and so does listening
            reply.error, reply.stopped = str(exc), "error"
            self._stop_player()
            raise
        except Exception as exc:  # noqa: BLE001 - any fault inside the model ends this turn only
            self._fail(reply, exc)
        except KeyboardInterrupt:
            # A second Ctrl-C while the turn was being cut: save what there is, then end.
            self.stop_requested = True
            reply.interrupted = True
            reply.stopped = reply.stopped or "interrupted"
            self._stop_player(reply)
        finally:
            self.buffer.end_reply()
            self._finish(question, reply)
            self._reply = None
        return reply

    def _generate(self, events: Iterator[Event], reply: ReplyProgress) -> None:
        """Stream the reply to the screen and the speaker; between events, listen for barge-in and Ctrl-C."""
        for event in events:
            reply.count(event)
            if isinstance(event, TextDelta):
                self._show_text(reply, event)
            elif isinstance(event, Units):
                reply.units += len(event.units)
                self.buffer.on_units(event.t, len(event.units))
            elif isinstance(event, AudioChunk):
                if not reply.interrupted and event.audio.size:
                    self._queue_audio(reply, event)
            elif isinstance(event, Done):
                reply.take_done(event)
            if not reply.interrupted:
                self._play(reply, self.buffer.take())
            self._listen_while_replying(reply, timeout=0.0)
            self._check_sound(reply)
            if self.stop_requested and not reply.interrupted:
                self._interrupt(reply)

    def _should_stop(self) -> bool:
        reply = self._reply
        return self.stop_requested or (reply is not None and reply.interrupted)

    def _show_text(self, reply: ReplyProgress, delta: TextDelta) -> None:
        if reply.first_text_t is None:
            reply.first_text_t = max(delta.t, self.clock())  # shown now: a speculative reply's text waited for the end of the turn
            if self.player is None:
                self.view.status("replying")
        reply.text += delta.text
        self.view.reply_text(delta.text)

    def _queue_audio(self, reply: ReplyProgress, chunk: AudioChunk) -> None:
        # The player is opened at the vocoder's rate and resamples to the device as one stream
        # (run_chat); resampling chunk by chunk here would click at every chunk boundary.
        reply.audio_rate = chunk.sample_rate
        reply.chunks.append(chunk.audio)
        if self.player is not None:
            self.buffer.push(chunk.audio, chunk.sample_rate)

    def _play(self, reply: ReplyProgress, chunks: list[np.ndarray]) -> None:
        if not chunks or self.player is None:
            return
        if not reply.played:
            reply.played = True
            self.view.status("speaking", "speak to interrupt" if self.full_duplex and self.listener is not None else "")
        for chunk in chunks:
            self.player.play(chunk)

    def _play_out(self, reply: ReplyProgress) -> None:
        """Wait until the reply has been heard, still listening for barge-in; give up on a stuck speaker."""
        player = self.player
        if player is None:
            return
        self._play(reply, self.buffer.release())
        player.finish()
        deadline = self.clock() + reply.audio_seconds + self.settings.playback_margin_s
        while player.playing:
            if self._check_sound(reply):
                return
            if self.stop_requested:
                self._interrupt(reply)
                return
            if self.listener is not None:
                self._listen_while_replying(reply, timeout=self.settings.poll_s)
            else:
                time.sleep(self.settings.poll_s)
            if reply.interrupted:
                return
            if self.clock() > deadline:
                self._drop_stuck_speaker(reply)
                return
        # The last block is still in the device buffer for its latency.
        if reply.played and player.output_latency > 0:
            time.sleep(player.output_latency)
        if not self.full_duplex:
            self._listen_while_replying(reply, timeout=0.0)

    def _check_sound(self, reply: ReplyProgress | None = None) -> bool:
        """As soon as the sound system is gone: while listening, raise MicrophoneLost (the session
        ends, or goes on typed); in a typed session, drop the speaker (True) and go on as text."""
        problem = self.sound_problem() if self.sound_problem is not None else None
        if problem is None:
            return False
        if self.listener is not None or reply is None:
            raise MicrophoneLost(problem)
        self.sound_problem = None
        self._drop_stuck_speaker(reply, problem.rstrip("."))
        return True

    def _drop_stuck_speaker(self, reply: ReplyProgress, why: str = "the speaker stopped taking audio (unplugged or busy?)") -> None:
        self._stop_player(reply)
        self.view.error(f"{why}; replies continue as text only.")
        self.recorder.event("error", turn=reply.turn, message=f"{why}; continuing without sound")
        self.player = None

    def _listen_while_replying(self, reply: ReplyProgress, timeout: float) -> None:
        """Drain the mic queue during a reply: detect barge-in, or (half-duplex) drop what was heard."""
        if self.listener is None:
            return
        if not self.full_duplex:
            self.listener.drop_heard(timeout)
            return
        if not self._full_duplex_said and self.settings.barge_in is None:
            self._full_duplex_said = True
            self.view.note("echo cancellation is on: speak over omni to interrupt it.")
            self.recorder.event("full_duplex", turn=reply.turn, erle_db=self._erle())
        if not reply.interrupted:
            start = self.listener.speech_start(timeout)
            if start is not None:
                self._barge_in(reply, start)

    def _barge_in(self, reply: ReplyProgress, event: SpeechStart) -> None:
        detected = self.clock()
        self._interrupt(reply)
        silent = self.player.silent_time() if self.player is not None and reply.played else None
        stopped = silent if silent is not None else self.clock()
        reply.barge_in_t = detected
        assert self.listener is not None
        onset = self.listener.clock_of(event.t)
        went_on = reply.voiced_end_stream_t is not None and (event.t - reply.voiced_end_stream_t) * 1000 <= self.settings.rejoin_ms
        if went_on:
            reply.withdrawn_at = event.t  # the user went on with the question after a long pause
        self.recorder.event(
            "barge_in",
            turn=reply.turn,
            onset_t=round(onset, 4),
            detected_t=detected,
            stopped_t=stopped,
            detect_ms=round((detected - onset) * 1000, 1),
            stop_ms=round((stopped - detected) * 1000, 1),
            speech_start_stream_s=event.t,
            goes_on_with_the_question=reply.withdrawn_at is not None,
        )
        self.view.status("hearing", "go on" if reply.withdrawn_at is not None else "interrupted the reply")

    def _interrupt(self, reply: ReplyProgress) -> None:
        """Cut playback now and make generation stop at its next token."""
        reply.interrupted = True
        reply.stopped = "interrupted"
        self._stop_player(reply)

    def _fail(self, reply: ReplyProgress, exc: Exception) -> None:
        """A fault inside the model or a device: one line on screen and in the transcript; the session goes on."""
        reply.error = one_line(exc)
        reply.stopped = "error"
        self._stop_player(reply)
        self.view.error(f"turn failed: {reply.error}")
        self.recorder.event("error", turn=reply.turn, message=reply.error)

    def _stop_player(self, reply: ReplyProgress | None = None) -> None:
        """Cut playback; for `reply`, note first what of it was heard."""
        if self.player is None:
            return
        if reply is not None and reply.played:
            self._note_heard(reply, cut=True)
        self.player.stop()

    def _note_heard(self, reply: ReplyProgress, cut: bool) -> None:
        """When this reply was first heard, and (when `cut`) how much of it, while the player still knows."""
        player = self.player
        if player is None or not reply.played:
            return
        if reply.first_audio_t is None and player.first_audio_time is not None:
            reply.first_audio_t = player.first_audio_time + player.output_latency
        if cut and reply.heard_seconds is None:
            reply.heard_seconds = round(min(player.heard_seconds, reply.audio_seconds), 3)

    def _erle(self) -> float | None:
        erle = self.echo.erle_db if self.echo is not None else None
        return None if erle is None else round(erle, 1)

    def _finish(self, question: np.ndarray | str, reply: ReplyProgress) -> None:
        """Save the reply (text, WAV, timings), show its summary, and keep it in the history."""
        self._note_heard(reply, cut=False)
        audio = np.concatenate(reply.chunks) if reply.chunks else None
        if audio is not None and reply.heard_seconds is not None:
            audio = audio[: int(round(reply.heard_seconds * reply.audio_rate))]  # only what was heard
        record = ReplyRecord(
            turn=reply.turn,
            text=reply.text,
            tokens=reply.tokens,
            units=reply.units,
            stopped=reply.stopped or "interrupted",
            heard_seconds=reply.heard_seconds,
            first_text_ms=milliseconds_since(reply.speech_end_t, reply.first_text_t),
            first_audio_t=None if reply.first_audio_t is None else round(reply.first_audio_t, 4),
            latency_ms=milliseconds_since(reply.speech_end_t, reply.first_audio_t),
            speculative=reply.speculative or None,
            barge_in_t=reply.barge_in_t,
            withdrawn=reply.withdrawn_at is not None or None,
            echo_erle_db=self._erle() if reply.played else None,
            error=reply.error,
        )
        self.view.reply_end(reply_summary(self.recorder.reply(record, audio, reply.audio_rate)))
        if reply.withdrawn_at is not None and not isinstance(question, str):
            # Not an answer to anything: the next turn asks this question again, with its rest.
            self._spoken.go_on_with(ContinuedQuestion(question, reply.audio_end_stream_t, reply.turn, reply.withdrawn_at))
        elif reply.error is None and reply.text:
            user_text = question if isinstance(question, str) else None
            self.history.append(HistoryTurn(user_speech=reply.user_speech, user_text=user_text, reply=reply.text))


def reply_summary(record: ReplyRecord) -> str:
    """The line closing a turn on screen: when it was heard (or seen), its length, and why it stopped if not at its end."""
    summary = [f"{record.tokens} tokens"]
    if record.latency_ms is not None:
        summary.insert(0, f"first audio {record.latency_ms:.0f} ms after you stopped")
    elif record.first_text_ms is not None:
        summary.insert(0, f"first text {record.first_text_ms:.0f} ms")
    if record.withdrawn:
        summary.append("withdrawn: you went on speaking")
    elif record.stopped != "eos":
        summary.append(record.stopped)
    return ", ".join(summary)


@contextmanager
def sigint_ends_session(session: ChatSession) -> Iterator[None]:
    """Within the block, Ctrl-C ends the session cleanly instead of raising anywhere.

    The first Ctrl-C cuts the reply in progress (it is saved) and ends the loop; while waiting
    for typed input, or on a second Ctrl-C, it raises KeyboardInterrupt, which the loops catch.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if session.stop_requested or session.waiting_for_input:
            raise KeyboardInterrupt
        session.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
