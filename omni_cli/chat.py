"""`omni chat`: the conversation loop — microphone → endpointer → pipeline → player and screen.

`ChatSession` owns the turn-taking and nothing else: the model (a `ReplySource`:
`respond(audio | text, history, should_stop)`, its `sample_rate` and `context_budget`), the
microphone (frames from `read()`), the endpointer, the player and the view are passed in, so
tests drive it with fakes and the CLI with real devices. Each turn is saved as it happens by `transcript.SessionRecorder`.

Turn-taking:
- Listening: mic frames go to the endpointer (`Listener`); a SpeechEnd is the user's turn.
- Replying: text goes to the view and audio chunks to the player as the pipeline yields them.
  Between events (the pipeline yields after every token) the microphone queue is drained:
  with barge-in, frames still go to the endpointer and a SpeechStart stops playback and
  generation at once; the interrupting utterance becomes the next turn. Without barge-in
  (half-duplex, the default: a speaker without echo cancellation would otherwise interrupt
  itself), frames heard while replying are dropped and the endpointer is reset afterwards.
- Multi-turn memory: finished turns (speech embeddings, on the CPU, or typed text, and the
  reply text) are kept in a `History` bounded by the pipeline's context budget and passed
  back with each question; the pipeline picks the newest ones that fit the prompt.
- Stopping: `request_stop()` (Ctrl-C, see `sigint_ends_session`) cuts the reply in progress,
  records it, and ends the loop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.audio.vad import Endpointer, SpeechEnd, SpeechStart
from omni_cli.audio.vad import Event as VadEvent
from omni_cli.chat_view import ChatView
from omni_cli.config import ChatOptions
from omni_cli.errors import AudioInputError, one_line
from omni_cli.pipeline import AudioChunk, Done, Event, History, HistoryTurn, TextDelta, Units
from omni_cli.transcript import ReplyRecord, SessionRecorder, milliseconds_since

if TYPE_CHECKING:  # the devices are imported when run_chat opens them, not with this module
    from omni_cli.audio.mic import Microphone
    from omni_cli.audio.player import Player
    from omni_cli.terminal import NativeStderr


class ReplySource(Protocol):
    """What the session needs from the model: `SpeechToSpeech` or a test double."""

    @property
    def sample_rate(self) -> int | None:
        """The reply audio's rate (the player is opened at it); None when replies are text only."""

    @property
    def context_budget(self) -> int:
        """Prompt positions for history, question and reply: turns beyond it are not kept."""

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]: ...


class FrameSource(Protocol):
    """What the session needs from the microphone: `Microphone` or a test double."""

    def read(self, timeout: float | None = None) -> np.ndarray | None: ...

    def clear(self) -> int: ...


class AudioSink(Protocol):
    """What the session needs from the speaker: `Player` or a test double."""

    first_audio_time: float | None

    def play(self, chunk: np.ndarray) -> None: ...

    def finish(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def playing(self) -> bool: ...

    @property
    def output_latency(self) -> float: ...


class MicrophoneLost(AudioInputError):
    """The microphone stopped delivering audio in the middle of a session."""


@dataclass(frozen=True)
class ChatSettings:
    """Turn-taking settings."""

    barge_in: bool = False
    poll_s: float = 0.05  # how long a wait for the next mic frame blocks while listening or speaking
    mic_timeout_s: float = 3.0  # no frame for this long means the microphone is gone
    playback_margin_s: float = 3.0  # playback may lag generation by this much before the speaker counts as stuck


class Listener:
    """The microphone through the endpointer: what the user says, as endpointer events.

    While listening, `next_events()` gives the events of the next frame, after those held back
    during a reply. While replying, `speech_start()` (barge-in) drains the queue until the user
    starts speaking and `drop_heard()` (half-duplex) throws away what the mic heard.
    """

    def __init__(
        self, mic: FrameSource, endpointer: Endpointer, settings: ChatSettings, clock: Callable[[], float], on_first_frame: Callable[[float], None]
    ) -> None:
        self.mic = mic
        self.endpointer = endpointer
        self.settings = settings
        self.clock = clock
        self.on_first_frame: Callable[[float], None] | None = on_first_frame
        self.held: deque[VadEvent] = deque()  # endpointer events heard while replying, for the listening loop
        self.last_frame_t = clock()  # when a frame last came (or the watch was restarted)

    def next_events(self) -> list[VadEvent]:
        """One held-back event, else the next frame's events ([] if none came within poll_s); raises MicrophoneLost."""
        if self.held:
            return [self.held.popleft()]
        frame = self.mic.read(timeout=self.settings.poll_s)
        now = self.clock()
        if frame is None:
            if now - self.last_frame_t > self.settings.mic_timeout_s:
                raise MicrophoneLost(
                    f"the microphone stopped delivering audio for {self.settings.mic_timeout_s:.0f} s "
                    "(unplugged, or taken by another program?); check it with `omni devices`."
                )
            return []
        self.last_frame_t = now
        if self.on_first_frame is not None:
            self.on_first_frame(now)
            self.on_first_frame = None
        return self.endpointer.push(frame)

    def restart_watch(self) -> None:
        """Count the microphone's silence from now (frames are not watched during a reply)."""
        self.last_frame_t = self.clock()

    def speech_start(self, timeout: float) -> SpeechStart | None:
        """Barge-in: push what the mic has (waiting up to `timeout` for a first frame) until speech starts.

        Every event, that SpeechStart included, is held for the listening loop.
        """
        block = timeout
        while True:
            frame = self.mic.read(timeout=block)
            block = 0.0
            if frame is None:
                return None
            events = self.endpointer.push(frame)
            self.held.extend(events)
            start = next((e for e in events if isinstance(e, SpeechStart)), None)
            if start is not None:
                return start

    def drop_heard(self, timeout: float) -> None:
        """Half-duplex: what the mic hears now is (mostly) our own voice; drop it, or wait `timeout` if there was none."""
        if self.mic.clear() == 0 and timeout > 0:
            time.sleep(timeout)
        self.endpointer.reset()


@dataclass
class ReplyProgress:
    """What one reply has produced so far, and how it ended."""

    turn: int
    heard_t: float  # when the user's turn ended: the endpoint decision, or Enter for typed text
    text: str = ""
    units: int = 0
    tokens: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    audio_rate: int = SAMPLE_RATE
    first_text_t: float | None = None
    stopped: str = ""
    interrupted: bool = False
    barge_in_t: float | None = None
    error: str | None = None
    user_speech: Any = None  # the turn's speech embeddings from Done, kept in the history

    @property
    def audio_seconds(self) -> float:
        return sum(c.size for c in self.chunks) / self.audio_rate

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
    ) -> None:
        if mic is not None and endpointer is None:
            raise ValueError("a microphone needs an endpointer")
        self.pipeline = pipeline
        self.view = view
        self.recorder = recorder
        self.player = player
        self.settings = settings or ChatSettings()
        self.clock = clock
        self.listener: Listener | None = None
        if mic is not None and endpointer is not None:
            # Frames flow from the first one on: from there, speech is heard.
            self.listener = Listener(mic, endpointer, self.settings, clock, lambda t: recorder.event("listening", t=t))
        self.history = History(budget=pipeline.context_budget)
        self.turns = 0
        self.stop_requested = False
        self.waiting_for_input = False  # True while blocked on typed input: Ctrl-C must interrupt the read
        self._reply: ReplyProgress | None = None
        self._closed = False

    # -- loops ------------------------------------------------------------------------

    @property
    def replying(self) -> bool:
        """True while a turn is being answered (generated or played)."""
        return self._reply is not None

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
                for event in listener.next_events():
                    if isinstance(event, SpeechStart):
                        self.view.status("hearing")
                    elif isinstance(event, SpeechEnd):
                        self.answer(event.audio, self.clock())
                        listener.restart_watch()
                        if not self.stop_requested:
                            self.view.status("listening")
        except KeyboardInterrupt:
            self.stop_requested = True

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
                    self.answer(line.strip(), self.clock())
        except KeyboardInterrupt:
            self.stop_requested = True

    def close(self, reason: str, **stats: Any) -> None:
        """Record the end of the session (with device `stats` such as overflow counts) and close the transcript (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_player()
        self.recorder.event("end", turns=self.turns, reason=reason, **stats)
        self.recorder.close()

    # -- one turn ---------------------------------------------------------------------

    def answer(self, question: np.ndarray | str, heard_t: float) -> ReplyProgress:
        """Answer one user turn (16 kHz speech or typed text) that ended at `heard_t`.

        The user turn is saved before the model runs; the reply is saved when it has been played,
        interrupted, or has failed (a failure is shown in one line and the session goes on).
        """
        self.turns += 1
        reply = self._reply = ReplyProgress(turn=self.turns, heard_t=heard_t)
        self.recorder.question(reply.turn, heard_t, question)
        if isinstance(question, str):
            self.view.user_typed(reply.turn, question)
        else:
            self.view.user_spoken(reply.turn, question.size / SAMPLE_RATE)
        self.view.status("thinking")
        try:
            self._generate(question, reply)
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
            self._stop_player()
        finally:
            self._finish(question, reply)
            self._reply = None
        return reply

    def _generate(self, question: np.ndarray | str, reply: ReplyProgress) -> None:
        """Stream the reply to the screen and the speaker; between events, listen for barge-in and Ctrl-C."""
        for event in self.pipeline.respond(question, self.history, self._should_stop):
            if isinstance(event, TextDelta):
                self._show_text(reply, event)
            elif isinstance(event, Units):
                reply.units += len(event.units)
            elif isinstance(event, AudioChunk):
                if not reply.interrupted and event.audio.size:
                    self._queue_audio(reply, event)
            elif isinstance(event, Done):
                reply.take_done(event)
            self._listen_while_replying(reply, timeout=0.0)
            self._check_sound(reply)
            if self.stop_requested and not reply.interrupted:
                self._interrupt(reply)

    def _should_stop(self) -> bool:
        reply = self._reply
        return self.stop_requested or (reply is not None and reply.interrupted)

    def _show_text(self, reply: ReplyProgress, delta: TextDelta) -> None:
        if reply.first_text_t is None:
            reply.first_text_t = delta.t
            if self.player is None:
                self.view.status("replying")
        reply.text += delta.text
        self.view.reply_text(delta.text)

    def _queue_audio(self, reply: ReplyProgress, chunk: AudioChunk) -> None:
        if not reply.chunks and self.player is not None:
            self.view.status("speaking", "speak to interrupt" if self.settings.barge_in and self.listener is not None else "")
        # The player is opened at the vocoder's rate and resamples to the device as one stream
        # (run_chat); resampling chunk by chunk here would click at every chunk boundary.
        reply.audio_rate = chunk.sample_rate
        reply.chunks.append(chunk.audio)
        if self.player is not None:
            self.player.play(chunk.audio)

    def _play_out(self, reply: ReplyProgress) -> None:
        """Wait until the reply has been heard, still listening for barge-in; give up on a stuck speaker."""
        player = self.player
        if player is None:
            return
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
        if reply.chunks and player.output_latency > 0:
            time.sleep(player.output_latency)
        if not self.settings.barge_in:
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
        self._stop_player()
        self.view.error(f"{why}; replies continue as text only.")
        self.recorder.event("error", turn=reply.turn, message=f"{why}; continuing without sound")
        self.player = None

    def _listen_while_replying(self, reply: ReplyProgress, timeout: float) -> None:
        """Drain the mic queue during a reply: detect barge-in, or (half-duplex) drop what was heard."""
        if self.listener is None:
            return
        if not self.settings.barge_in:
            self.listener.drop_heard(timeout)
        elif not reply.interrupted:
            start = self.listener.speech_start(timeout)
            if start is not None:
                self._barge_in(reply, start)

    def _barge_in(self, reply: ReplyProgress, event: SpeechStart) -> None:
        detected = self.clock()
        self._interrupt(reply)
        stopped = self.clock()
        reply.barge_in_t = detected
        self.recorder.event(
            "barge_in",
            turn=reply.turn,
            detected_t=detected,
            stopped_t=stopped,
            stop_ms=round((stopped - detected) * 1000, 2),
            speech_start_stream_s=event.t,
        )
        self.view.status("hearing", "interrupted the reply")

    def _interrupt(self, reply: ReplyProgress) -> None:
        """Cut playback now and make generation stop at its next token."""
        reply.interrupted = True
        reply.stopped = "interrupted"
        self._stop_player()

    def _fail(self, reply: ReplyProgress, exc: Exception) -> None:
        """A fault inside the model or a device: one line on screen and in the transcript; the session goes on."""
        reply.error = one_line(exc)
        reply.stopped = "error"
        self._stop_player()
        self.view.error(f"turn failed: {reply.error}")
        self.recorder.event("error", turn=reply.turn, message=reply.error)

    def _stop_player(self) -> None:
        if self.player is not None:
            self.player.stop()

    def _finish(self, question: np.ndarray | str, reply: ReplyProgress) -> None:
        """Save the reply (text, WAV, timings), show its summary, and keep it in the history."""
        first_audio_t = self.player.first_audio_time if self.player is not None and reply.chunks else None
        if first_audio_t is not None and first_audio_t < reply.heard_t:
            first_audio_t = None  # left over from an earlier reply: this one was never heard
        record = ReplyRecord(
            turn=reply.turn,
            text=reply.text,
            tokens=reply.tokens,
            units=reply.units,
            stopped=reply.stopped or "interrupted",
            first_text_ms=milliseconds_since(reply.heard_t, reply.first_text_t),
            first_audio_t=first_audio_t,
            latency_ms=milliseconds_since(reply.heard_t, first_audio_t),
            barge_in_t=reply.barge_in_t,
            error=reply.error,
        )
        audio = np.concatenate(reply.chunks) if reply.chunks else None
        self.view.reply_end(reply_summary(self.recorder.reply(record, audio, reply.audio_rate)))
        if reply.error is None and reply.text:
            user_text = question if isinstance(question, str) else None
            self.history.append(HistoryTurn(user_speech=reply.user_speech, user_text=user_text, reply=reply.text))


def reply_summary(record: ReplyRecord) -> str:
    """The line closing a turn on screen: when it was heard (or seen), its length, and why it stopped if not at its end."""
    summary = [f"{record.tokens} tokens"]
    if record.latency_ms is not None:
        summary.insert(0, f"first audio {record.latency_ms:.0f} ms after you stopped")
    elif record.first_text_ms is not None:
        summary.insert(0, f"first text {record.first_text_ms:.0f} ms")
    if record.stopped != "eos":
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


def run_chat(
    pipeline: ReplySource,
    options: ChatOptions,
    view: ChatView,
    read_line: Callable[[], str | None] | None = None,
    native_log: NativeStderr | None = None,
) -> int:
    """Open the devices, run the conversation until Ctrl-C (or end of typed input), save it; returns the exit code.

    A speaker that cannot be opened leaves replies as text; a microphone that cannot be opened
    is an AudioInputError (raised, nothing recorded yet). A microphone lost mid-session, or the
    sound server gone (noticed within about a second), ends the session (exit code 1) unless
    stdin is a terminal, where the session goes on with typed questions. `native_log`, when
    given, moves into the session folder once it exists.
    """
    from omni_cli.audio.mic import Microphone
    from omni_cli.audio.vad import EndpointerConfig
    from omni_cli.audio.watch import SoundWatch
    from omni_cli.terminal import NATIVE_LOG_NAME

    read_line = read_line or (lambda: view.prompt("you> "))
    vad_config = EndpointerConfig(hangover_ms=options.hangover_ms, aggressiveness=options.vad_aggressiveness)
    mic: Microphone | None = None
    if not options.text:
        mic = Microphone(device=options.input_device, frame_ms=vad_config.frame_ms, sample_rate=vad_config.sample_rate).start()
    recorder: SessionRecorder | None = None
    player: Player | None = None
    saved = ""
    try:
        recorder = SessionRecorder(options.session_dir)
        if native_log is not None:
            native_log.keep_in(options.session_dir / NATIVE_LOG_NAME)
        player = _open_speaker(pipeline.sample_rate, options.output_device, view)
        endpointer = Endpointer(vad_config) if mic is not None else None
        settings = ChatSettings(barge_in=options.barge_in)
        session = ChatSession(pipeline, view, recorder, mic=mic, endpointer=endpointer, player=player, settings=settings)
        if mic is not None or player is not None:
            session.sound_problem = SoundWatch(mic, player).problem
        recorder.event(
            "session",
            mode="text" if mic is None else "voice",
            barge_in=options.barge_in,
            microphone=None if mic is None else mic.device_name,
            microphone_rate=None if mic is None else mic.device_rate,
            speaker=None if player is None else player.device_name,
            speaker_rate=None if player is None else player.device_rate,
        )
        view.note(f"saving this session to {options.session_dir}/")
        view.start()
        with sigint_ends_session(session):
            code = _converse(session, read_line, mic, player)
        view.stop()
        saved = f"session saved: {recorder.transcript_path} ({session.turns} turns)"
        return code
    finally:
        view.stop()
        for opened in (recorder, player, mic):
            if opened is not None:
                opened.close()
        if saved:  # said once the devices let go (closing on a hung sound server takes 2 s): the process ends right after
            view.note(saved)


def _open_speaker(sample_rate: int | None, device: str | None, view: ChatView) -> Player | None:
    """The player at the reply audio's rate; None (replies as text, said on screen) without a vocoder or a speaker."""
    from omni_cli.audio.player import Player

    if sample_rate is None:
        view.note("no --vocoder: replies are text only.")
        return None
    try:
        return Player(device=device, sample_rate=sample_rate).start()
    except AudioInputError as exc:
        view.error(f"{exc} Replies will be text only.")
        return None


def _converse(session: ChatSession, read_line: Callable[[], str | None], mic: Microphone | None, player: Player | None) -> int:
    """Run the session until it ends, then record the end with the devices' counters; returns the exit code."""
    from omni_cli.audio.watch import SoundWatch

    code, reason = 0, "end of input"
    try:
        if mic is not None:
            session.run_voice()
        else:
            session.run_text(read_line)
    except MicrophoneLost as exc:
        session.view.error(str(exc))
        session.recorder.event("error", message=str(exc))
        if mic is not None:
            mic.close()
        session.listener = None
        if _stdin_is_terminal() and not session.stop_requested:
            if player is not None and not player.active:  # the sound server went with the microphone
                session.player = None
            session.sound_problem = SoundWatch(None, session.player).problem if session.player is not None else None
            session.view.note("going on with typed questions" + ("." if session.player is not None else ", replies as text."))
            session.run_text(read_line)
        else:
            code, reason = 1, "microphone lost"
    finally:
        if session.stop_requested:
            reason = "ctrl-c"
        counters: dict[str, int] = {}
        if mic is not None:
            counters.update(mic_overflows=mic.overflows, mic_dropped_frames=mic.dropped_frames)
        if player is not None:
            counters.update(speaker_underruns=player.underruns, speaker_xruns=player.xruns)
        session.close(reason, **counters)
    return code


def _stdin_is_terminal() -> bool:
    import sys

    try:
        return sys.stdin.isatty()
    except (ValueError, AttributeError):
        return False
