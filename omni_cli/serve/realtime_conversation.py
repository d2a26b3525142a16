"""A Realtime session's conversation: the one turn-taking engine (`conversation.Conversation`) behind `/v1/realtime`.

`RealtimeConversation` is the `ConversationPort` of one WebSocket session. It owns one
`Conversation`, run on its own thread: the client's audio (`session.audio`, a `ClientAudio`)
is its input, `ClientPlayback` (reply audio out as `response.output_audio.delta`) its sink, and
every reply goes through the server's `ModelSlot` (speculative drafts included), so sessions
take turns for the one model and never see each other's history. The session's settings become
the conversation's: server VAD's silence and padding its hang-over and pre-roll, `null` turn
detection client-committed turns, `interrupt_response` barge-in, `instructions` the system
prompt. The conversation's events become Realtime events through `RealtimeReplies`, with the
turn ↔ item bookkeeping a truncate needs. Turns the protocol answers only on `response.create`
wait for it at a `ResponseGate` before they ask for the model.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from omni_cli.audio.vad import EndpointerConfig
from omni_cli.config import ChatOptions, ReplyOptions
from omni_cli.conversation.engine import Conversation
from omni_cli.conversation.events import (
    ConversationError,
    ConversationEvent,
    QuestionCommitted,
    ReplyDone,
    ReplyStarted,
    ReplyTextDelta,
    ReplyTruncated,
    SpeechStarted,
    SpeechStopped,
)
from omni_cli.conversation.turns import ConversationSettings
from omni_cli.errors import one_line
from omni_cli.pipeline import Done, Event, History
from omni_cli.serve.client_playback import ClientPlayback
from omni_cli.serve.model_slot import ModelSlot, TurnWithdrawn
from omni_cli.serve.realtime_events import SessionConfig, TurnDetection
from omni_cli.serve.response_gate import ResponseGate

if TYPE_CHECKING:
    from omni_cli.serve.realtime_session import PortFactory, RealtimeSession

# How a reply ended (the conversation's word) → response.done's status and reason.
RESPONSE_END = {
    "completed": ("completed", None),
    "budget": ("incomplete", "max_output_tokens"),
    "interrupted": ("cancelled", "turn_detected"),  # speech over the reply (barge-in)
    "cancelled": ("cancelled", "client_cancelled"),
    "error": ("failed", None),
}
REMEMBERED_ITEMS = 64  # replies a truncate may still name (RealtimeReplies checks the same number)


def _log(line: str) -> None:
    """One line in the server's log (its stderr), as chat completions' failures are."""
    print(f"omni serve: error: {line}", file=sys.stderr, flush=True)


def conversation_ports(
    slot: ModelSlot, speculate_ms: int = ChatOptions.speculate_ms, answer_after_ms: int = ChatOptions.answer_after_ms
) -> PortFactory:
    """The port factory `omni serve` uses: each Realtime session gets its own conversation over `slot`."""
    return lambda session: RealtimeConversation(session, slot, speculate_ms, answer_after_ms)


class RealtimeConversation:
    """One session's conversation, on its own thread; every method returns at once (thread-safe)."""

    def __init__(
        self,
        session: RealtimeSession,
        slot: ModelSlot,
        speculate_ms: int = ChatOptions.speculate_ms,
        answer_after_ms: int = ChatOptions.answer_after_ms,
    ) -> None:
        """`speculate_ms`: a reply is drafted after this much of a pause (as `omni chat --speculate-ms`; 0: never).
        `answer_after_ms`: with barge-in on (`interrupt_response`) and the default `silence_duration_ms`, the
        turn ends after this much silence, and the reply is withdrawn if the user goes on within a second (as
        `omni chat --answer-after-ms`; 0: never). A `silence_duration_ms` the client sets is kept as given."""
        self.session = session
        self.slot = slot
        self.speculate_ms = speculate_ms
        self.answer_after_ms = answer_after_ms
        pipeline = slot.pipeline
        self.can_speak = pipeline.sample_rate is not None and pipeline.model.unit_decoder is not None
        self.view = slot.for_conversation(on_wait=session.replies.waiting)
        self.gate = ResponseGate()
        self.closed = False
        self._lock = threading.Lock()
        self._auto_reply = True  # spoken turns heard by server VAD are answered without response.create
        self._next: tuple[int, bool] | None = None  # (turn, waits for response.create) of the turn about to be answered
        self._items: OrderedDict[int, str] = OrderedDict()  # turn → its reply's item id
        self._turns: dict[str, int] = {}  # reply item id → turn
        self._truncating: dict[int, tuple[str, int]] = {}  # turn → (item id, audio_end_ms) of a truncate not yet settled
        self._input_tokens = 0  # the prompt's positions of the reply in progress (usage)
        config = session.config
        self._endpointer = self._turn_detection(config)
        self._barge_in = self._interrupts(config)
        self._early_end_ms = self._answer_after(config)
        settings = ConversationSettings(
            turn_detection=self._endpointer,
            barge_in=self._barge_in,
            speculate=speculate_ms > 0,
            mic_timeout_s=None,
            full_duplex_hangover_ms=self._early_end_ms,
        )
        sink = ClientPlayback(session.replies, pipeline.sample_rate) if self.can_speak and pipeline.sample_rate else None
        self.conversation = Conversation(_SessionReplies(self), self._on_event, frames=session.audio, sink=sink, settings=settings)
        self._apply(config)
        self._thread = threading.Thread(target=self._run, name=f"omni-realtime-{session.id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.conversation.run()
        except Exception as exc:  # noqa: BLE001 - the session is told; the server goes on
            _log(f"a Realtime conversation stopped: {one_line(exc)}")
            self.session.error(f"the conversation stopped: {one_line(exc)}; reconnect to start a new one.", "server_error")
        finally:
            self.conversation.close()

    # -- the session's settings --------------------------------------------------------------

    def _turn_detection(self, config: SessionConfig) -> EndpointerConfig | None:
        """Server VAD's settings as the endpointer's (None: the client commits its turns)."""
        detection = config.turn_detection
        if detection is None:
            return None
        hangover = detection.silence_duration_ms
        # A draft is only worth starting when the turn is answered as soon as it ends.
        drafts = detection.create_response and 0 < self.speculate_ms < hangover
        return EndpointerConfig(
            hangover_ms=hangover,
            pre_roll_ms=detection.prefix_padding_ms,
            start_threshold=detection.threshold,
            # Silero's threshold to stay in speech keeps the endpointer's ratio to the one that starts it.
            keep_threshold=detection.threshold * EndpointerConfig.keep_threshold / EndpointerConfig.start_threshold,
            pause_ms=self.speculate_ms if drafts else 0,
        )

    def _answer_after(self, config: SessionConfig) -> int | None:
        """The earlier turn end for this session (full duplex only): omni's guess while the client keeps
        server VAD's default silence; a silence_duration_ms it sets is honoured as given."""
        detection = config.turn_detection
        if detection is None or not self.answer_after_ms or detection.silence_duration_ms != TurnDetection.silence_duration_ms:
            return None
        return self.answer_after_ms

    @staticmethod
    def _interrupts(config: SessionConfig) -> bool:
        return config.turn_detection is not None and config.turn_detection.interrupt_response

    def _reply_options(self, config: SessionConfig) -> ReplyOptions:
        sampling = self.slot.pipeline.streaming.sampling
        limit = config.max_output_tokens
        if limit is not None:
            sampling = replace(sampling, max_new_tokens=min(limit, sampling.max_new_tokens))
        return ReplyOptions(system=config.instructions, sampling=sampling, speak=self.can_speak and "audio" in config.output_modalities)

    def _apply(self, config: SessionConfig) -> None:
        with self._lock:
            self.view.options = self._reply_options(config)
            self._auto_reply = config.turn_detection is not None and config.turn_detection.create_response

    def configure(self, config: SessionConfig) -> None:
        """session.update: turn detection (switched once no reply is in progress), barge-in, instructions, limits."""
        self._apply(config)
        endpointer = self._turn_detection(config)
        if endpointer != self._endpointer:
            self._endpointer = endpointer
            self.conversation.set_turn_detection(endpointer)
        duplex = (self._interrupts(config), self._answer_after(config))
        if duplex != (self._barge_in, self._early_end_ms):
            self._barge_in, self._early_end_ms = duplex
            self.conversation.set_duplex(*duplex)

    # -- the client's requests ------------------------------------------------------------------

    def commit(self) -> None:
        """input_audio_buffer.commit: the turn ends now (answered on response.create unless server VAD answers it)."""
        if not self._auto_reply:
            self.gate.expect()
        self.conversation.commit()

    def clear(self) -> None:
        """input_audio_buffer.clear: the turn in progress is forgotten."""
        self.conversation.clear()
        self.session.replies.cleared()

    def create_response(self, settings: SessionConfig) -> None:
        """response.create: answer the turn waiting for it, with `settings` for that reply alone."""
        if not self.gate.request(settings):
            self.session.error(
                "nothing to answer: commit audio (input_audio_buffer.commit) or add a user message first; "
                "with server VAD's create_response on, spoken turns are answered without response.create.",
                "no_turn_to_answer",
            )

    def ask_text(self, text: str) -> None:
        """A user text message: a typed turn, answered on response.create."""
        self.gate.expect()
        self.conversation.ask_text(text)

    def cancel(self) -> None:
        """response.cancel: the reply in progress stops (its audio now, generation at its next token)."""
        if self.session.replies.reply_item is None:
            self.session.error("there is no response in progress to cancel.", "response_cancel_not_active")
            return
        self.conversation.cancel()

    def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """conversation.item.truncate: the history keeps the text of the `audio_end_ms` the client played."""
        with self._lock:
            turn = self._turns.get(item_id)
            if turn is None:  # the session checked the item is one of its replies: it is too old to remember
                self.session.error(f"{item_id} is no longer remembered; truncate a recent reply.", "item_not_found", "item_id")
                return
            self._truncating[turn] = (item_id, audio_end_ms)
        self.conversation.truncate(turn, audio_end_ms / 1000)

    def close(self) -> None:
        """The client went away: the reply in progress stops at its next token, a waiting one leaves the queue."""
        self.closed = True
        self.gate.close()
        self.conversation.stop()

    # -- the conversation's events (on its thread) ---------------------------------------------

    def _on_event(self, event: ConversationEvent) -> None:
        replies = self.session.replies
        if isinstance(event, SpeechStarted):
            if not event.continued:  # already announced (at a barge-in, or before a 30 s window)
                replies.speech_started(event.onset_t)
        elif isinstance(event, SpeechStopped):
            replies.speech_stopped(event.speech_end_t)
        elif isinstance(event, QuestionCommitted):
            self._committed(event)
        elif isinstance(event, ReplyStarted):
            if self._next is None or not self._next[1]:
                self._start_response(event.turn)
        elif isinstance(event, ReplyTextDelta):
            replies.reply_text(event.text)
        elif isinstance(event, ReplyDone):
            self._done(event)
        elif isinstance(event, ReplyTruncated):
            self._truncated(event.turn)
        elif isinstance(event, ConversationError):
            self._error(event)

    def _committed(self, event: QuestionCommitted) -> None:
        replies = self.session.replies
        if event.text is not None:
            replies.text_item(event.text)
            waits = True
        else:
            replies.committed()
            with self._lock:
                waits = not self._auto_reply
        if waits:
            self.gate.committed()
        self._next = (event.turn, waits)

    def _start_response(self, turn: int, settings: SessionConfig | None = None) -> None:
        """response.created and the reply's item, now that the reply is asked for (with `settings`
        of its own, from response.create; else the session's)."""
        replies = self.session.replies
        replies.reply_started(None if settings is None else "audio" in settings.output_modalities)
        item_id = replies.reply_item
        assert item_id is not None
        with self._lock:
            self._items[turn] = item_id
            self._turns[item_id] = turn
            while len(self._items) > REMEMBERED_ITEMS:
                _, old = self._items.popitem(last=False)
                self._turns.pop(old, None)

    def _done(self, event: ReplyDone) -> None:
        self._next = None
        reply_item = self.session.replies.reply_item
        with self._lock:
            started = reply_item is not None and self._items.get(event.turn) == reply_item
        if started:
            status, reason = RESPONSE_END[event.reason]
            self.session.replies.reply_done(status, reason, self._input_tokens, event.tokens)

    def _truncated(self, turn: int) -> None:
        with self._lock:
            asked = self._truncating.pop(turn, None)
        if asked is not None:
            self.session.replies.truncated(*asked)

    def _error(self, event: ConversationError) -> None:
        if event.code == "unknown_turn" and event.turn in self._truncating:
            self._truncated(event.turn)  # nothing of that reply is remembered: nothing more to cut
        elif event.code == "empty_input":
            self.gate.came_to_nothing()
            self.session.error(event.message, "input_audio_buffer_commit_empty")
        elif event.code == "no_reply":
            self.session.error("there is no response in progress to cancel.", "response_cancel_not_active")
        elif event.code == "question_too_long":
            self.session.error(event.message, "context_length_exceeded")  # OpenAI's code for it
        elif event.code == "reply_failed":
            _log(f"a Realtime reply failed: {event.message}")
            self.session.error(f"the reply failed: {event.message}", "reply_failed")
        else:
            self.session.error(event.message, event.code)


class _SessionReplies:
    """The model as the session's conversation sees it: through the ModelSlot, after the ResponseGate.

    respond() is called on the conversation's thread right after ReplyStarted (or at a pause,
    for a draft, before any turn is committed); nothing runs until its first event is asked for.
    """

    def __init__(self, port: RealtimeConversation) -> None:
        self.port = port

    @property
    def sample_rate(self) -> int | None:
        return self.port.view.sample_rate if self.port.can_speak else None

    @property
    def context_budget(self) -> int:
        return self.port.view.context_budget

    @property
    def chunk_units(self) -> int:
        return self.port.view.chunk_units

    def respond(self, audio: Any, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        port = self.port
        stop = should_stop or (lambda: False)
        turn, waits = port._next or (0, False)
        options = None
        if waits:
            granted, settings = port.gate.wait(lambda: port.closed or stop())
            if not granted:
                return
            port._next = None
            port._start_response(turn, settings)
            if settings is not None:  # this response's own instructions, modalities and token limit
                options = port._reply_options(settings)
        port._input_tokens = 0
        try:
            for event in port.view.respond(audio, history, lambda: port.closed or stop(), options):
                if isinstance(event, Done):
                    port._input_tokens = event.prompt_positions
                yield event
        except TurnWithdrawn:  # the client went away while the reply waited for the model
            return
