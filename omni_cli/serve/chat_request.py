"""A chat completions request (OpenAI's JSON) → the question, the earlier turns and this reply's options.

The last message must be the user's: its audio (`input_audio` parts, wav or pcm16) is the
spoken question, text beside that audio is the instruction sent with it; a user message with
only text is a typed question, answered by the LLM in text. Earlier user/assistant pairs become
the reply's `History` (earlier audio is encoded when the model is lent, see `history_turns`);
system and developer messages replace the reference's system prompt. What omni cannot do
(several choices, tools, stop sequences, JSON mode) is refused by name, never silently ignored.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from omni_cli.config import ReplyOptions, SamplingConfig
from omni_cli.errors import OmniError
from omni_cli.serve.wire_audio import BadAudio, decode_question

if TYPE_CHECKING:
    from omni_cli.pipeline import HistoryTurn, SpeechToSpeech

AUDIO_FORMATS = ("wav", "pcm16")


class RequestError(OmniError):
    """A request omni cannot answer as sent: HTTP 400 with OpenAI's error shape, naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass
class EarlierTurn:
    """One finished exchange sent back by the client: the user's audio or text, and the reply's text."""

    user_audio: np.ndarray | None
    user_text: str
    reply: str


@dataclass
class CompletionRequest:
    """What a chat completions request asks for, checked."""

    question: np.ndarray | str
    earlier: list[EarlierTurn]
    options: ReplyOptions
    audio_format: str | None  # None: text only
    stream: bool = False
    include_usage: bool = False
    voice: str | None = None


class AudioTranscripts:
    """The transcripts of the spoken replies this server gave, by audio id, until they expire.

    A client continues a conversation by sending `{"role": "assistant", "audio": {"id": ...}}`
    instead of the reply's text; this is where that text is found again. Bounded in count and time.
    """

    def __init__(self, ttl_s: int, max_items: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, audio_id: str, transcript: str) -> int:
        """Keep a reply's transcript; returns when it expires (Unix time, as OpenAI's `expires_at`)."""
        expires = time.time() + self.ttl_s
        with self._lock:
            self._items[audio_id] = (transcript, expires)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return int(expires)

    def get(self, audio_id: str) -> str | None:
        """The transcript, or None when the id is unknown or expired."""
        with self._lock:
            item = self._items.get(audio_id)
        if item is None or item[1] < time.time():
            return None
        return item[0]


def _text_of(content: Any, where: str) -> str:
    """A message's text content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}[{i}] is a {kind!r} part; only text parts are read here.", f"{where}[{i}]")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise RequestError(f"{where} must be a string or a list of content parts.", where)


def _user_content(content: Any, where: str) -> tuple[list[np.ndarray], str]:
    """A user message → its audio parts (16 kHz) and its text."""
    if content is None or isinstance(content, str):
        return [], content or ""
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts.", where)
    audio: list[np.ndarray] = []
    texts: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "input_audio":
            spec = part.get("input_audio")
            if not isinstance(spec, dict):
                raise RequestError(f"{where}[{i}].input_audio must be an object with data and format.", f"{where}[{i}]")
            if spec.get("format") not in ("wav", "pcm16", "mp3", "flac", "ogg"):
                raise RequestError(
                    f"{where}[{i}].input_audio.format {spec.get('format')!r} is not supported; send wav or pcm16.", f"{where}[{i}]"
                )
            try:
                audio.append(decode_question(spec.get("data"), spec.get("format")))
            except BadAudio as exc:
                raise RequestError(f"{where}[{i}]: {exc}", f"{where}[{i}]") from exc
        else:
            raise RequestError(f"{where}[{i}] is a {kind!r} part; omni reads text and input_audio parts.", f"{where}[{i}]")
    return audio, "\n".join(t for t in texts if t)


def _sampling(body: dict[str, Any], defaults: SamplingConfig, ceiling: int) -> SamplingConfig:
    """temperature, top_p, seed and max_tokens, with the server's settings where the request says nothing."""
    def number(name: str, low: float, high: float) -> float | None:
        value = body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise RequestError(f"{name} must be a number from {low} to {high}.", name)
        return float(value)

    temperature = number("temperature", 0, 2)
    top_p = number("top_p", 0, 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed must be an integer.", "seed")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RequestError("max_tokens must be a positive integer.", "max_tokens")
    return SamplingConfig(
        max_new_tokens=min(limit or defaults.max_new_tokens, ceiling),
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None or top_p == 0 else top_p,
        top_k=defaults.top_k,
        seed=seed if seed is not None else defaults.seed,
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: omni gives one reply per request.", "n")
    for name in ("tools", "functions", "stop"):
        if body.get(name):
            raise RequestError(f"{name} is not supported by omni serve; send the request without it.", name)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise RequestError("response_format must be text: omni has no JSON mode.", "response_format")


def parse_request(
    body: Any, defaults: SamplingConfig, speak_ceiling: int, text_ceiling: int, transcripts: AudioTranscripts, can_speak: bool
) -> CompletionRequest:
    """Check a request body and turn it into a `CompletionRequest`; RequestError names what is wrong.

    `speak_ceiling` / `text_ceiling`: the most tokens a spoken / a text-only reply may ask for.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    _refuse_unsupported(body)
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"}:
        raise RequestError('modalities must be ["text"] or ["text", "audio"].', "modalities")
    audio_format = None
    voice = None
    if "audio" in modalities:
        if not can_speak:
            raise RequestError("this server was started without --vocoder: it answers in text only; ask for modalities [\"text\"].", "modalities")
        spec = body.get("audio") or {}
        audio_format = spec.get("format", "wav") if isinstance(spec, dict) else None
        if audio_format not in AUDIO_FORMATS:
            raise RequestError('audio.format must be "wav" or "pcm16".', "audio.format")
        voice = spec.get("voice")
    stream = bool(body.get("stream"))
    if stream and audio_format == "wav":
        raise RequestError('a streamed reply sends its audio as pcm16 chunks; ask for audio.format "pcm16".', "audio.format")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage")) if isinstance(stream_options, dict) else False

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list.", "messages")
    system: list[str] = []
    earlier: list[EarlierTurn] = []
    user_audio: list[np.ndarray] = []
    user_text: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with a role.", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content"), f"{where}.content"))
        elif role == "user":
            audio, text = _user_content(message.get("content"), f"{where}.content")
            user_audio += audio
            user_text += [text] if text else []
        elif role == "assistant":
            reply = _text_of(message.get("content"), f"{where}.content")
            audio_ref = message.get("audio")
            if not reply and isinstance(audio_ref, dict) and audio_ref.get("id"):
                found = transcripts.get(str(audio_ref["id"]))
                if found is None:
                    raise RequestError(f"{where}.audio.id {audio_ref['id']!r} is unknown or expired; send the reply's text instead.", f"{where}.audio")
                reply = found
            joined = np.concatenate(user_audio) if user_audio else None
            earlier.append(EarlierTurn(joined, "\n".join(user_text), reply))
            user_audio, user_text = [], []
        else:
            raise RequestError(f"{where}.role {role!r} is not supported; use system, developer, user or assistant.", where)
    if not user_audio and not user_text:
        raise RequestError("the last message must be the user's question (text or input_audio).", "messages")
    question: np.ndarray | str = np.concatenate(user_audio) if user_audio else "\n".join(user_text)
    instruction = "\n".join(user_text) if user_audio and user_text else None
    sampling = _sampling(body, defaults, speak_ceiling if audio_format else text_ceiling)
    options = ReplyOptions(
        system="\n\n".join(system) if system else None,
        speech_instruction=instruction,
        sampling=sampling,
        speak=audio_format is not None,
    )
    return CompletionRequest(question, earlier, options, audio_format, stream, include_usage, voice)


def history_turns(pipeline: SpeechToSpeech, earlier: list[EarlierTurn]) -> list[HistoryTurn]:
    """The earlier turns as the pipeline's history, their audio encoded (call while holding the model)."""
    from omni_cli.pipeline import HistoryTurn

    turns = []
    for turn in earlier:
        speech = None if turn.user_audio is None else pipeline.encode_speech(turn.user_audio).detach().cpu()
        turns.append(HistoryTurn(user_speech=speech, user_text=turn.user_text or None, reply=turn.reply))
    return turns
