"""The OpenAI Realtime protocol's events, as omni speaks them: the session's settings, and every server event.

GA names and shapes by default; a client that connected with `OpenAI-Beta: realtime=v1` gets
the beta names (`response.audio.delta`, `conversation.item.created`, ...) and the beta session
shape (top-level `input_audio_format`, `turn_detection`, `modalities`). Field names follow the
`openai` package's own types (`openai/types/realtime/`, `openai/types/beta/realtime/`); the
tests validate every event built here against them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from omni_cli.serve.wire_audio import PCM16_RATE

# GA name → beta name, for the events whose name changed; GA-only events are not sent to beta clients.
BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_ONLY = frozenset({"conversation.item.done"})


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: a prefix and random hex (`item_…`, `resp_…`, `event_…`)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class ClientError(Exception):
    """A client event omni cannot act on: becomes an `error` event; the connection goes on."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.event_id = event_id


@dataclass(frozen=True)
class TurnDetection:
    """server_vad settings: the silence that ends a turn, the audio kept from before speech began, how sure to be."""

    silence_duration_ms: int = 500
    prefix_padding_ms: int = 300
    threshold: float = 0.5
    create_response: bool = True  # answer when the turn ends (else wait for response.create)
    interrupt_response: bool = True  # speech during a reply cancels it (barge-in)

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "server_vad",
            "silence_duration_ms": self.silence_duration_ms,
            "prefix_padding_ms": self.prefix_padding_ms,
            "threshold": self.threshold,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }


@dataclass(frozen=True)
class SessionConfig:
    """One Realtime session's settings (what session.update may change)."""

    model: str = "llama-omni"
    instructions: str | None = None  # the system prompt; None: the reference's
    turn_detection: TurnDetection | None = TurnDetection()  # None: client-committed turns
    voice: str = "omni"  # LLaMA-Omni has one voice; a requested name is kept but changes nothing
    output_modalities: tuple[str, ...] = ("audio",)
    max_output_tokens: int | None = None  # None: the server's --max-new-tokens

    def audio_format(self) -> dict[str, Any]:
        return {"type": "audio/pcm", "rate": PCM16_RATE}

    def as_ga(self, session_id: str) -> dict[str, Any]:
        """The GA `session` object (session.created / session.updated)."""
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": self.model,
            "instructions": self.instructions or "",
            "output_modalities": list(self.output_modalities),
            "max_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
            "audio": {
                "input": {
                    "format": self.audio_format(),
                    "turn_detection": None if self.turn_detection is None else self.turn_detection.as_dict(),
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": self.audio_format(), "voice": self.voice, "speed": 1.0},
            },
            "tools": [],
            "tool_choice": "auto",
        }

    def as_beta(self, session_id: str) -> dict[str, Any]:
        """The beta `session` object."""
        modalities = ["text", "audio"] if "audio" in self.output_modalities else ["text"]
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": self.model,
            "modalities": modalities,
            "instructions": self.instructions or "",
            "voice": self.voice,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "turn_detection": None if self.turn_detection is None else self.turn_detection.as_dict(),
            "max_response_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
            "tools": [],
            "tool_choice": "auto",
        }


def _check_format(value: Any, param: str) -> None:
    """Only PCM16 at 24 kHz travels: the GA `{type: "audio/pcm", rate: 24000}` or the beta "pcm16"."""
    if value is None or value == "pcm16":
        return
    if isinstance(value, dict) and value.get("type") == "audio/pcm" and value.get("rate", PCM16_RATE) == PCM16_RATE:
        return
    raise ClientError(f'{param}: omni takes and sends audio/pcm at 24000 Hz only (beta: "pcm16").', "unsupported_audio_format", param)


def _turn_detection(value: Any, current: TurnDetection | None, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object or null.", param=param)
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ClientError(f"{param}.type {kind!r} is not supported; use server_vad or null.", param=param)
    base = current or TurnDetection()
    fields: dict[str, Any] = {}
    for name, kind_of, low, high in (
        ("silence_duration_ms", int, 30, 10_000),
        ("prefix_padding_ms", int, 0, 5_000),
        ("threshold", float, 0.0, 1.0),
    ):
        if value.get(name) is None:
            continue
        number = value[name]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high:
            raise ClientError(f"{param}.{name} must be a number from {low} to {high}.", param=f"{param}.{name}")
        fields[name] = kind_of(number)
    for name in ("create_response", "interrupt_response"):
        if value.get(name) is not None:
            fields[name] = bool(value[name])
    # semantic_vad is answered with server_vad: omni's endpointer is the turn model it has.
    return replace(base, **fields)


def apply_session_update(config: SessionConfig, session: Any) -> SessionConfig:
    """`session.update`'s `session` (GA or beta shape) applied to `config`; ClientError for what omni cannot do."""
    if not isinstance(session, dict):
        raise ClientError("session.update needs a session object.", param="session")
    if session.get("type") not in (None, "realtime"):
        raise ClientError(f"session.type {session['type']!r} is not supported; omni serves realtime sessions.", param="session.type")
    fields: dict[str, Any] = {}
    if "instructions" in session:
        instructions = session["instructions"]
        if instructions is not None and not isinstance(instructions, str):
            raise ClientError("session.instructions must be a string.", param="session.instructions")
        fields["instructions"] = instructions or None
    audio = session.get("audio") or {}
    if not isinstance(audio, dict):
        raise ClientError("session.audio must be an object.", param="session.audio")
    audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
    _check_format(audio_in.get("format"), "session.audio.input.format")
    _check_format(audio_out.get("format"), "session.audio.output.format")
    _check_format(session.get("input_audio_format"), "session.input_audio_format")
    _check_format(session.get("output_audio_format"), "session.output_audio_format")
    for key, where in (("turn_detection", audio_in), ("turn_detection", session)):
        if key in where:
            param = "session.audio.input.turn_detection" if where is audio_in else "session.turn_detection"
            fields["turn_detection"] = _turn_detection(where[key], config.turn_detection, param)
    voice = audio_out.get("voice", session.get("voice"))
    if voice is not None:
        fields["voice"] = voice if isinstance(voice, str) else str(voice.get("id", "omni")) if isinstance(voice, dict) else "omni"
    fields.update(_reply_fields(session, "session"))
    return replace(config, **fields)


def apply_response_settings(config: SessionConfig, response: Any) -> SessionConfig:
    """`response.create`'s `response`: the session's settings with this one response's own
    (instructions, output_modalities, max_output_tokens); ClientError for what omni cannot do."""
    if not isinstance(response, dict):
        raise ClientError("response.create's response must be an object.", param="response")
    fields = _reply_fields(response, "response")
    if "instructions" in response:
        instructions = response["instructions"]
        if instructions is not None and not isinstance(instructions, str):
            raise ClientError("response.instructions must be a string.", param="response.instructions")
        if instructions:  # an empty one keeps the session's, as before
            fields["instructions"] = instructions
    if response.get("conversation") == "none":
        raise ClientError("out-of-band responses (conversation: none) are not supported by omni serve.", param="response.conversation")
    return replace(config, **fields)


def _reply_fields(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """What a reply is made of, as session.update and response.create both give it: modalities, token limit, no tools."""
    fields: dict[str, Any] = {}
    modalities = settings.get("output_modalities", settings.get("modalities"))
    if modalities is not None:
        if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or not modalities:
            raise ClientError('output_modalities must be ["audio"] or ["text"].', param=f"{where}.output_modalities")
        fields["output_modalities"] = ("audio",) if "audio" in modalities else ("text",)
    limit = settings.get("max_output_tokens", settings.get("max_response_output_tokens"))
    if limit is not None:
        if limit == "inf":
            fields["max_output_tokens"] = None
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ClientError('max_output_tokens must be a positive integer or "inf".', param=f"{where}.max_output_tokens")
        else:
            fields["max_output_tokens"] = limit
    if settings.get("tools"):
        raise ClientError("tools are not supported by omni serve.", param=f"{where}.tools")
    return fields


class EventWriter:
    """Builds server events for one connection: ids, and the GA or beta names and shapes."""

    def __init__(self, beta: bool = False) -> None:
        self.beta = beta

    def event(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """One server event, or None where the client's protocol version has no such event."""
        if self.beta and kind in GA_ONLY:
            return None
        name = BETA_NAMES.get(kind, kind) if self.beta else kind
        return {"type": name, "event_id": new_id("event"), **fields}

    def session(self, kind: str, config: SessionConfig, session_id: str) -> dict[str, Any] | None:
        """session.created / session.updated."""
        return self.event(kind, session=config.as_beta(session_id) if self.beta else config.as_ga(session_id))

    def error(self, message: str, code: str = "invalid_request_error", param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
        """An `error` event; the connection goes on."""
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param, "event_id": event_id}
        return {"type": "error", "event_id": new_id("event"), "error": error}

    def user_item(self, item_id: str, status: str = "completed", transcript: str | None = None, text: str | None = None) -> dict[str, Any]:
        """A user message: the committed audio (not sent back), or the `text` the client typed."""
        part = {"type": "input_audio", "transcript": transcript} if text is None else {"type": "input_text", "text": text}
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status, "content": [part]}

    def assistant_item(self, item_id: str, status: str, transcript: str, audio: bool = True) -> dict[str, Any]:
        """The reply's message item, its transcript so far."""
        if audio:
            part = {"type": "audio" if self.beta else "output_audio", "transcript": transcript}
        else:
            part = {"type": "text" if self.beta else "output_text", "text": transcript}
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status, "content": [part]}

    def response(
        self, response_id: str, status: str, output: list[dict[str, Any]], audio: bool, reason: str | None = None, usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A `response` object (response.created / response.done)."""
        modalities = ["audio"] if audio else ["text"]
        body: dict[str, Any] = {
            "id": response_id,
            "object": "realtime.response",
            "status": status,
            "status_details": None if reason is None else {"type": status, "reason": reason},
            "output": output,
            "usage": usage,
            "conversation_id": None,
        }
        if self.beta:
            body["modalities"] = ["text", "audio"] if audio else ["text"]
            body["output_audio_format"] = "pcm16"
        else:
            body["output_modalities"] = modalities
            body["audio"] = {"output": {"format": {"type": "audio/pcm", "rate": PCM16_RATE}}}
        return body


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A Realtime `usage` object from the prompt's positions and the reply's tokens."""
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
