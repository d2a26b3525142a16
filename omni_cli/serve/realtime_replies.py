"""What the conversation does, as Realtime server events: the user's turns and omni's replies, with their ids.

The conversation (on its own thread) calls these methods as things happen; each sends the
Realtime events that belong to it, in the protocol's order:

- `speech_started(t)` / `speech_stopped(t)`: `input_audio_buffer.speech_started` / `.speech_stopped`
  (`audio_start_ms` / `audio_end_ms`: where time `t` lies in the client's audio);
- `committed()`: `input_audio_buffer.committed`, then the user item (`conversation.item.added` / `.done`);
- `text_item(text)`: a typed user message (`conversation.item.added` / `.done`);
- `cleared()`: `input_audio_buffer.cleared`;
- `waiting(ahead)`: the reply waits for the model (`omni.response.waiting`, an event of omni's own);
- `reply_started()`: `response.created`, the assistant item (`response.output_item.added`,
  `conversation.item.added`) and its content part;
- `reply_text(delta)`: `response.output_audio_transcript.delta` (`response.output_text.delta` for text-only sessions);
- `reply_audio(chunk, rate)`: `response.output_audio.delta` (PCM16 24 kHz, resampled without seams);
- `reply_done(status, ...)`: the `.done` events and `response.done` (`completed`, `cancelled` with
  `turn_detected` or `client_cancelled`, `incomplete`, `failed`), with usage;
- `truncated(item_id, audio_end_ms)`: `conversation.item.truncated`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from omni_cli.serve.client_audio import ClientAudio
from omni_cli.serve.realtime_events import ClientError, EventWriter, SessionConfig, new_id, usage
from omni_cli.serve.wire_audio import ReplyAudioStream, encode_pcm16


class SessionChannel(Protocol):
    """What the replies need of their session (`RealtimeSession`): where events go, how they are named,
    the session's settings, and the client's audio clock."""

    writer: EventWriter
    config: SessionConfig
    audio: ClientAudio

    def emit(self, kind: str, **fields: Any) -> None: ...


class _Reply:
    """The reply in progress: its ids, its text so far, its audio stream."""

    def __init__(self, audio: bool) -> None:
        self.response_id = new_id("resp")
        self.item_id = new_id("item")
        self.audio = audio
        self.text = ""
        self.stream: ReplyAudioStream | None = None


class RealtimeReplies:
    """Turns one conversation's events into Realtime events for one session (thread-safe)."""

    def __init__(self, session: SessionChannel, remembered_items: int = 64) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._user_item: str | None = None  # the user item being spoken (speech started, not yet committed)
        self._last_item: str | None = None  # for previous_item_id
        self._reply: _Reply | None = None
        # Assistant item id → milliseconds of its audio sent, so a truncate can be checked.
        self._sent_ms: OrderedDict[str, int] = OrderedDict()
        self._remembered = remembered_items

    @property
    def reply_item(self) -> str | None:
        """The item id of the reply in progress, if any."""
        with self._lock:
            return None if self._reply is None else self._reply.item_id

    def _emit(self, kind: str, **fields: Any) -> None:
        self.session.emit(kind, **fields)

    # -- the user's turn -------------------------------------------------------------------

    def _pending_user_item(self) -> str:
        with self._lock:
            if self._user_item is None:
                self._user_item = new_id("item")
            return self._user_item

    def speech_started(self, t: float) -> None:
        """The conversation heard speech begin at time `t`."""
        self._emit("input_audio_buffer.speech_started", audio_start_ms=self.session.audio.stream_ms_at(t), item_id=self._pending_user_item())

    def speech_stopped(self, t: float) -> None:
        """The user's voiced speech ended at time `t`."""
        self._emit("input_audio_buffer.speech_stopped", audio_end_ms=self.session.audio.stream_ms_at(t), item_id=self._pending_user_item())

    def committed(self, transcript: str | None = None) -> str:
        """The user's turn is committed (by the endpointer or the client); returns its item id."""
        item_id = self._pending_user_item()
        with self._lock:
            previous, self._last_item, self._user_item = self._last_item, item_id, None
        writer = self.session.writer
        self._emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self._emit("conversation.item.added", item=writer.user_item(item_id, "completed", transcript), previous_item_id=previous)
        self._emit("conversation.item.done", item=writer.user_item(item_id, "completed", transcript), previous_item_id=previous)
        return item_id

    def text_item(self, text: str) -> str:
        """A user text message was taken as the next turn: the user item (`conversation.item.added` / `.done`); its id."""
        item_id = new_id("item")
        with self._lock:
            previous, self._last_item = self._last_item, item_id
        item = self.session.writer.user_item(item_id, "completed", text=text)
        self._emit("conversation.item.added", item=item, previous_item_id=previous)
        self._emit("conversation.item.done", item=item, previous_item_id=previous)
        return item_id

    def cleared(self) -> None:
        """The uncommitted audio was dropped."""
        with self._lock:
            self._user_item = None
        self._emit("input_audio_buffer.cleared")

    # -- omni's reply ----------------------------------------------------------------------

    def waiting(self, ahead: int) -> None:
        """The reply waits for the model: `ahead` replies (other sessions' or requests') come first."""
        self._emit("omni.response.waiting", replies_ahead=ahead)

    def reply_started(self, audio: bool | None = None) -> str:
        """A reply begins, spoken (`audio`; None: as the session's output_modalities say) or text only; returns its response id."""
        if audio is None:
            audio = "audio" in self.session.config.output_modalities
        reply = _Reply(audio)
        with self._lock:
            self._reply = reply
            previous, self._last_item = self._last_item, reply.item_id
        writer = self.session.writer
        item = writer.assistant_item(reply.item_id, "in_progress", "", audio)
        self._emit("response.created", response=writer.response(reply.response_id, "in_progress", [], audio))
        self._emit("response.output_item.added", response_id=reply.response_id, output_index=0, item=item)
        self._emit("conversation.item.added", item=item, previous_item_id=previous)
        self._emit("response.content_part.added", response_id=reply.response_id, item_id=reply.item_id, output_index=0,
                   content_index=0, part=self._part(reply))
        return reply.response_id

    def _part(self, reply: _Reply) -> dict[str, Any]:
        if reply.audio:
            return {"type": "audio", "transcript": reply.text}
        return {"type": "text", "text": reply.text}

    def _ids(self, reply: _Reply) -> dict[str, Any]:
        return {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}

    def reply_text(self, delta: str) -> None:
        """New reply text, as the LLM writes it."""
        with self._lock:
            reply = self._reply
            if reply is None or not delta:
                return
            reply.text += delta
        kind = "response.output_audio_transcript.delta" if reply.audio else "response.output_text.delta"
        self._emit(kind, delta=delta, **self._ids(reply))

    def reply_audio(self, chunk: np.ndarray, rate: int) -> None:
        """A chunk of the spoken reply (float32 at `rate`)."""
        with self._lock:
            reply = self._reply
            if reply is None or not reply.audio:
                return
            reply.stream = reply.stream or ReplyAudioStream(rate)
            samples = reply.stream.push(chunk)
            self._remember(reply.item_id, reply.stream.sent_ms)
        if samples.size:
            self._emit("response.output_audio.delta", delta=encode_pcm16(samples), **self._ids(reply))

    def reply_done(self, status: str = "completed", reason: str | None = None, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """The reply ended: `completed`, `cancelled` (reason `turn_detected` or `client_cancelled`), `incomplete`
        (reason `max_output_tokens`) or `failed`."""
        with self._lock:
            reply, self._reply = self._reply, None
        if reply is None:
            return
        writer = self.session.writer
        if reply.audio:
            tail = reply.stream.finish() if reply.stream is not None and status == "completed" else np.zeros(0, np.float32)
            if tail.size and reply.stream is not None:
                self._remember(reply.item_id, reply.stream.sent_ms)
                self._emit("response.output_audio.delta", delta=encode_pcm16(tail), **self._ids(reply))
            self._emit("response.output_audio.done", **self._ids(reply))
            self._emit("response.output_audio_transcript.done", transcript=reply.text, **self._ids(reply))
        else:
            self._emit("response.output_text.done", text=reply.text, **self._ids(reply))
        item_status = "completed" if status == "completed" else "incomplete"
        item = writer.assistant_item(reply.item_id, item_status, reply.text, reply.audio)
        self._emit("response.content_part.done", part=self._part(reply), **self._ids(reply))
        self._emit("response.output_item.done", response_id=reply.response_id, output_index=0, item=item)
        self._emit("conversation.item.done", item=item)
        body = writer.response(reply.response_id, status, [item], reply.audio, reason, usage(input_tokens, output_tokens))
        self._emit("response.done", response=body)

    def truncated(self, item_id: str, audio_end_ms: int) -> None:
        """The conversation cut that reply to what the client played."""
        self._emit("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)

    # -- checks ----------------------------------------------------------------------------

    def _remember(self, item_id: str, sent_ms: int) -> None:
        self._sent_ms[item_id] = sent_ms
        self._sent_ms.move_to_end(item_id)
        while len(self._sent_ms) > self._remembered:
            self._sent_ms.popitem(last=False)

    def check_truncate(self, item_id: str, audio_end_ms: int) -> None:
        """ClientError unless `item_id` is a reply of this session with at least `audio_end_ms` of audio sent."""
        with self._lock:
            sent = self._sent_ms.get(item_id)
        if sent is None:
            raise ClientError(f"no assistant audio item {item_id!r} in this session.", "item_not_found", "item_id")
        # A chunk's last millisecond may round either way between the client's count and ours.
        if audio_end_ms > sent + 1:
            raise ClientError(f"audio_end_ms {audio_end_ms} is past the {sent} ms of audio sent for {item_id}.", "invalid_value", "audio_end_ms")

