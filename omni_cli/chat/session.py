"""`omni chat`'s side of a conversation: its events on the screen and on disk, and Ctrl-C.

`ChatSession` wraps a `conversation.Conversation` (the turn-taking: microphone frames in, reply
audio to the player) and turns what it says into the rich view (`ChatView`) and the session
folder (`SessionRecorder`: transcript.jsonl and the turns' WAVs), line by line as it happens.
`chat.devices.run_chat` opens the devices and hands them in; tests pass fakes.

The transcript's lines and what the screen shows, per event: the first frame heard →
"listening"; a committed question → "user" (and its WAV) and "you [n]: ..."; the reply's text
→ the screen as it comes; a barge-in → "barge_in"; the reply's end → "assistant" (its WAV holds
what was heard) and the summary line; a dropped draft → "speculative_reply_dropped"; a 30 s
window → "long_speech"; full duplex → "full_duplex"; a failed turn or speaker → "error".
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.chat.transcript import ReplyRecord, SessionRecorder
from omni_cli.chat.view import ChatView
from omni_cli.conversation.engine import Conversation
from omni_cli.conversation.events import (
    BargeIn,
    ConversationError,
    ConversationEvent,
    DraftDropped,
    FullDuplexOn,
    Listening,
    QuestionCommitted,
    ReplyDone,
    ReplyPlaybackStarted,
    ReplyStarted,
    ReplyTextDelta,
    SpeakerDropped,
    SpeechStarted,
    StillListening,
)
from omni_cli.conversation.ports import AudioSink, EchoState, FrameSource, ReplySource
from omni_cli.conversation.turns import ConversationSettings
from omni_cli.pipeline import History

# The transcript's word for how a reply stopped (a cancel is Ctrl-C here: "interrupted").
STOPPED = {"completed": "eos", "budget": "budget", "interrupted": "interrupted", "cancelled": "interrupted", "error": "error"}


class ChatSession:
    """One `omni chat` session: a conversation shown on the terminal and saved as it goes."""

    def __init__(
        self,
        pipeline: ReplySource,
        view: ChatView,
        recorder: SessionRecorder,
        mic: FrameSource | None = None,
        player: AudioSink | None = None,
        settings: ConversationSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        echo: EchoState | None = None,
    ) -> None:
        self.view = view
        self.recorder = recorder
        self.conversation = Conversation(pipeline, self.on_event, frames=mic, sink=player, settings=settings, echo=echo, clock=clock)
        self.waiting_for_input = False  # True while blocked on typed input: Ctrl-C must interrupt the read
        self.last_reply: ReplyDone | None = None
        self._text_shown: int | None = None  # the turn whose reply text is on screen
        self._closed = False

    @property
    def stop_requested(self) -> bool:
        return self.conversation.stopping

    @property
    def turns(self) -> int:
        return self.conversation.turns

    @property
    def history(self) -> History:
        return self.conversation.history

    @property
    def replying(self) -> bool:
        """True while a turn is being answered (generated or played)."""
        return self.conversation.replying

    def request_stop(self) -> None:
        """End the session soon: the reply in progress is cut and recorded, then the loop returns."""
        self.conversation.stop()

    # -- loops ------------------------------------------------------------------------

    def run_voice(self) -> None:
        """Listen and answer until request_stop(); raises MicrophoneLost if the mic stops delivering."""
        self.view.status("listening", "speak; Ctrl-C ends the session")
        self.conversation.run()

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
                    self.ask(line.strip())
        except KeyboardInterrupt:
            self.request_stop()

    def ask(self, text: str) -> ReplyDone | None:
        """Answer one typed question now; its ReplyDone."""
        self.last_reply = None
        self.conversation.ask_text(text)
        self.conversation.run(until_idle=True)
        return self.last_reply

    def close(self, reason: str, **stats: Any) -> None:
        """Record the end of the session (with device `stats` such as overflow counts) and close the transcript (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.conversation.close()
        self.recorder.event("end", turns=self.turns, reason=reason, speculative_replies_dropped=self.conversation.drafts_dropped, **stats)
        self.recorder.close()

    # -- events -----------------------------------------------------------------------

    def on_event(self, event: ConversationEvent) -> None:
        """Show and save one conversation event (on the conversation's thread, as it happens)."""
        view, recorder = self.view, self.recorder
        if isinstance(event, Listening):
            if event.first:
                recorder.event("listening", t=event.t)
            else:
                view.status("listening")
        elif isinstance(event, SpeechStarted):
            view.status("hearing")
        elif isinstance(event, QuestionCommitted):
            self._question(event)
        elif isinstance(event, ReplyStarted):
            view.status("thinking")
        elif isinstance(event, ReplyTextDelta):
            if self._text_shown != event.turn:
                self._text_shown = event.turn
                if self.conversation.sink is None:
                    view.status("replying")
            view.reply_text(event.text)
        elif isinstance(event, ReplyPlaybackStarted):
            view.status("speaking", "speak to interrupt" if event.interruptible else "")
        elif isinstance(event, BargeIn):
            self._barge_in(event)
        elif isinstance(event, ReplyDone):
            self._reply_done(event)
        elif isinstance(event, DraftDropped):
            recorder.event("speculative_reply_dropped", after_pause_ms=event.after_pause_ms, tokens=event.tokens)
        elif isinstance(event, FullDuplexOn):
            view.note("echo cancellation is on: speak over omni to interrupt it.")
            recorder.event("full_duplex", turn=event.turn, erle_db=event.erle_db)
        elif isinstance(event, StillListening):
            view.note(f"still listening: your turn passed {event.seconds:.0f} s (the model hears 30 s at a time); what you say next is added to it.")
            view.status("hearing", f"{event.seconds:.0f} s so far")
            recorder.event("long_speech", seconds=round(event.seconds, 2), windows=event.windows)
        elif isinstance(event, SpeakerDropped):
            view.error(f"{event.why}; replies continue as text only.")
            recorder.event("error", turn=event.turn, message=f"{event.why}; continuing without sound")
        elif isinstance(event, ConversationError):
            view.error(f"turn failed: {event.message}" if event.code == "reply_failed" else event.message)
            where = {} if event.turn is None else {"turn": event.turn}
            recorder.event("error", **where, message=event.message)

    def _question(self, event: QuestionCommitted) -> None:
        heard = event.heard
        self.recorder.question(
            event.turn,
            heard.end_t,
            event.question,
            speech_end_t=None if event.text is not None else heard.speech_end_t,
            end_of_turn_ms=heard.end_of_turn_ms,
            windows=heard.windows if heard.windows > 1 else None,
            continues=heard.continues,
            decided_t=None if event.text is not None else round(event.t, 4),
        )
        if event.text is not None:
            self.view.user_typed(event.turn, event.text)
        elif event.audio is not None:
            self.view.user_spoken(event.turn, event.audio.size / SAMPLE_RATE)

    def _barge_in(self, event: BargeIn) -> None:
        self.recorder.event(
            "barge_in",
            turn=event.turn,
            onset_t=round(event.onset_t, 4),
            detected_t=event.detected_t,
            stopped_t=event.stopped_t,
            detect_ms=round((event.detected_t - event.onset_t) * 1000, 1),
            stop_ms=round((event.stopped_t - event.detected_t) * 1000, 1),
            speech_start_stream_s=event.stream_t,
            goes_on_with_the_question=event.goes_on,
        )
        self.view.status("hearing", "go on" if event.goes_on else "interrupted the reply")

    def _reply_done(self, event: ReplyDone) -> None:
        """Save the reply (text, the WAV of what was heard, timings) and show its summary."""
        self.last_reply = event
        record = ReplyRecord(
            turn=event.turn,
            text=event.text,
            tokens=event.tokens,
            units=event.units,
            stopped=STOPPED[event.reason],
            heard_seconds=event.heard_seconds,
            first_text_ms=event.first_text_ms,
            playback_t=None if event.playback_t is None else round(event.playback_t, 4),
            first_audio_t=None if event.first_audio_t is None else round(event.first_audio_t, 4),
            latency_ms=event.latency_ms,
            speculative=event.speculative or None,
            barge_in_t=event.barge_in_t,
            withdrawn=event.withdrawn or None,
            echo_erle_db=event.echo_erle_db,
            error=event.error,
        )
        self.view.reply_end(reply_summary(self.recorder.reply(record, event.audio, event.audio_rate)))


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
