"""One `/v1/realtime` connection's protocol: client events in, handled by family; the conversation's events out.

`RealtimeSession.handle(text)` parses one client message and routes it: the session
(`session.update`), the input audio buffer (`append` → `ClientAudio` frames, `commit`, `clear`),
responses (`response.create`, `response.cancel`) and the conversation (`conversation.item.truncate`,
`conversation.item.create` with text). Whatever cannot be done becomes an `error` event and the
connection goes on. Turn-taking itself is not here: the session drives a `ConversationPort`, and
the conversation's events come back through `RealtimeReplies` (see realtime_replies.py), which
turns them into Realtime events with the right item and response ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from omni_cli.serve.client_audio import ClientAudio
from omni_cli.serve.realtime_events import ClientError, EventWriter, SessionConfig, apply_response_settings, apply_session_update, new_id
from omni_cli.serve.realtime_replies import RealtimeReplies
from omni_cli.serve.wire_audio import BadAudio

Send = Callable[[dict[str, Any]], None]
"""Queues one server event for the client; safe to call from any thread."""


class ConversationPort(Protocol):
    """What a Realtime session asks of the conversation behind it; each call returns at once (thread-safe).

    The conversation reads the client's audio from `session.audio` (a FrameSource) and reports
    what happens through `session.replies`.
    """

    def configure(self, config: SessionConfig) -> None:
        """New settings: turn detection (server VAD with its silence/padding/threshold, or None), instructions, limits."""

    def commit(self) -> None:
        """input_audio_buffer.commit: the audio since the last commit or clear is the user's turn."""

    def clear(self) -> None:
        """input_audio_buffer.clear: forget the uncommitted audio."""

    def create_response(self, settings: SessionConfig) -> None:
        """response.create: answer the latest committed turn with `settings` (the session's, with the
        response's own instructions, output modalities and token limit)."""

    def ask_text(self, text: str) -> None:
        """conversation.item.create with a user text message: a typed turn."""

    def cancel(self) -> None:
        """response.cancel: stop the reply in progress (generation at its next token)."""

    def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """conversation.item.truncate: the client played only `audio_end_ms` of that reply; history keeps what was heard."""

    def close(self) -> None:
        """The client went away: stop the reply in progress at once, free the model, end the conversation."""


PortFactory = Callable[["RealtimeSession"], ConversationPort]


class RealtimeSession:
    """The protocol state of one Realtime connection: settings, the client's audio, ids, and the conversation port."""

    def __init__(
        self, send: Send, port_factory: PortFactory, config: SessionConfig, max_buffered_s: float, beta: bool = False
    ) -> None:
        self.send = send
        self.config = config
        self.beta = beta
        self.id = new_id("sess")
        self.writer = EventWriter(beta)
        self.audio = ClientAudio(max_buffered_s)
        self.replies = RealtimeReplies(self)
        self.port_factory = port_factory
        self.port: ConversationPort | None = None
        self.errors = 0  # error events sent, for tests and logs
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "conversation.item.truncate": self._truncate,
            "conversation.item.create": self._item_create,
        }

    def emit(self, kind: str, **fields: Any) -> None:
        """Send one server event by its GA name (renamed or left out for beta clients)."""
        event = self.writer.event(kind, **fields)
        if event is not None:
            self.send(event)

    def error(self, message: str, code: str = "invalid_request_error", param: str | None = None, event_id: str | None = None) -> None:
        """Send an `error` event; the connection goes on."""
        self.errors += 1
        self.send(self.writer.error(message, code, param, event_id))

    def start(self) -> None:
        """The connection is open: say session.created, then start the conversation behind it."""
        created = self.writer.session("session.created", self.config, self.id)
        assert created is not None
        self.send(created)
        self.port = self.port_factory(self)
        self.port.configure(self.config)

    def close(self) -> None:
        """The connection closed: the conversation stops at once (frees the model)."""
        if self.port is not None:
            self.port.close()

    # -- client events ---------------------------------------------------------------------

    def handle(self, text: str | bytes) -> None:
        """One client message: parsed, checked, routed to its handler; problems become error events."""
        event_id = None
        try:
            try:
                event = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ClientError(f"the message is not valid JSON ({exc.__class__.__name__}: {exc}).", "invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ClientError("a client event is a JSON object with a string `type`.", "invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self._handlers.get(event["type"])
            if handler is None:
                raise ClientError(f"unknown or unsupported event type {event['type']!r}.", "unknown_event", "type")
            handler(event)
        except ClientError as exc:
            self.error(str(exc), exc.code, exc.param, exc.event_id or event_id)
        except BadAudio as exc:
            self.error(str(exc), "invalid_audio", "audio", event_id)

    def _port(self) -> ConversationPort:
        assert self.port is not None, "start() first"
        return self.port

    def _session_update(self, event: dict[str, Any]) -> None:
        self.config = apply_session_update(self.config, event.get("session"))
        self._port().configure(self.config)
        updated = self.writer.session("session.updated", self.config, self.id)
        assert updated is not None
        self.send(updated)

    def _append(self, event: dict[str, Any]) -> None:
        self.audio.append(event.get("audio"))

    def _commit(self, event: dict[str, Any]) -> None:
        self._port().commit()

    def _clear(self, event: dict[str, Any]) -> None:
        self.audio.clear()
        self._port().clear()

    def _response_create(self, event: dict[str, Any]) -> None:
        self._port().create_response(apply_response_settings(self.config, event.get("response") or {}))

    def _response_cancel(self, event: dict[str, Any]) -> None:
        self._port().cancel()

    def _truncate(self, event: dict[str, Any]) -> None:
        item_id, audio_end_ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item_id, str):
            raise ClientError("conversation.item.truncate needs item_id.", param="item_id")
        if isinstance(audio_end_ms, bool) or not isinstance(audio_end_ms, int) or audio_end_ms < 0:
            raise ClientError("conversation.item.truncate needs audio_end_ms, a whole number of ms from 0.", param="audio_end_ms")
        self.replies.check_truncate(item_id, audio_end_ms)
        self._port().truncate(item_id, audio_end_ms)

    def _item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise ClientError("conversation.item.create takes a user message with input_text content.", param="item")
        content = item.get("content")
        texts = [part.get("text", "") for part in content or [] if isinstance(part, dict) and part.get("type") in ("input_text", "text")]
        if not texts or not isinstance(content, list) or len(texts) != len(content):
            raise ClientError("conversation.item.create takes input_text parts only (speak through input_audio_buffer.append).", param="item.content")
        self._port().ask_text("\n".join(str(t) for t in texts))

