"""`POST /v1/chat/completions`: one reply through the model slot, as one JSON body or as server-sent chunks.

The reply is generated on a worker thread (torch blocks) that takes its turn for the model and
hands the pipeline's events to the event loop; the response is shaped as OpenAI's: `content`
(the reply text), and with `modalities: ["text", "audio"]` also `audio` (`id`, `data`,
`transcript`, `expires_at`). Streamed, text arrives as `delta.content` (and
`delta.audio.transcript`) and speech as `delta.audio.data` (PCM16, 24 kHz) while the reply is
spoken. A client that goes away stops the reply at its next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from omni_cli.serve.chat_request import CompletionRequest, history_turns
from omni_cli.serve.model_slot import ModelBusy, SlotClosed, TurnWithdrawn
from omni_cli.serve.wire_audio import PCM16_RATE, ReplyAudioStream, encode_pcm16, wav_base64

if TYPE_CHECKING:
    from omni_cli.pipeline import Done, Event
    from omni_cli.serve.chat_request import AudioTranscripts
    from omni_cli.serve.model_slot import ModelSlot

FINISH_REASONS = {"eos": "stop", "budget": "length", "interrupted": "stop"}


@dataclass(frozen=True)
class Waiting:
    """The request waits for the model: `ahead` replies come first."""

    ahead: int


@dataclass(frozen=True)
class Failed:
    """The reply could not be made: a line for people, and the HTTP status it means."""

    message: str
    status: int
    code: str


async def reply_events(slot: ModelSlot, request: CompletionRequest, cancelled: threading.Event) -> AsyncIterator[Event | Waiting | Failed]:
    """The reply's pipeline events, made on a worker thread that holds the model while it runs.

    Setting `cancelled` (or leaving the iteration early, which sets it) stops the reply at its
    next token, or takes the request out of the queue while it waits.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            with slot.hold(cancelled.is_set, lambda ahead: put(Waiting(ahead))) as pipeline:
                history = history_turns(pipeline, request.earlier)
                stop = lambda: cancelled.is_set() or slot.closed  # noqa: E731
                for event in pipeline.respond(request.question, history, stop, request.options):
                    put(event)
        except ModelBusy as exc:
            put(Failed(str(exc), 503, "model_busy"))
        except SlotClosed as exc:
            put(Failed(str(exc), 503, "server_stopping"))
        except TurnWithdrawn:
            pass
        except Exception as exc:  # noqa: BLE001 - one line for the client and one in the server's log; the server goes on
            message = f"the reply failed inside the model: {type(exc).__name__}: {exc}"
            print(f"omni serve: error: {message}", file=sys.stderr, flush=True)
            put(Failed(message, 500, "model_error"))
        finally:
            put(end)

    threading.Thread(target=work, name="omni-chat-completion", daemon=True).start()
    try:
        while (item := await queue.get()) is not end:
            yield item
    finally:
        cancelled.set()


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class CompletionShape:
    """Builds one request's response objects: ids, the audio in the asked format, usage."""

    def __init__(self, request: CompletionRequest, model_name: str, sample_rate: int | None, transcripts: AudioTranscripts) -> None:
        self.request = request
        self.model_name = model_name
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.audio_id = f"audio_{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.sample_rate = sample_rate or PCM16_RATE
        self.transcripts = transcripts

    def usage(self, done: Done) -> dict[str, int]:
        return {"prompt_tokens": done.prompt_positions, "completion_tokens": done.tokens, "total_tokens": done.prompt_positions + done.tokens}

    def body(self, done: Done, audio: list[np.ndarray]) -> dict[str, Any]:
        """The whole reply as one `chat.completion`."""
        message: dict[str, Any] = {"role": "assistant", "content": done.text, "refusal": None}
        if self.request.audio_format is not None:
            samples = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
            if self.request.audio_format == "wav":
                data = wav_base64(samples, self.sample_rate)
            else:
                stream = ReplyAudioStream(self.sample_rate)
                data = encode_pcm16(np.concatenate([stream.push(samples), stream.finish()]))
            expires = self.transcripts.add(self.audio_id, done.text)
            message["audio"] = {"id": self.audio_id, "data": data, "transcript": done.text, "expires_at": expires}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": FINISH_REASONS[done.stopped], "logprobs": None}],
            "usage": self.usage(done),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, usage: dict[str, int] | None = None) -> str:
        """One server-sent `chat.completion.chunk` line."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_name,
            "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def collect(events: AsyncIterator[Event | Waiting | Failed], is_gone: Callable[[], Any]) -> tuple[Done | None, list[np.ndarray], Failed | None]:
    """Run a whole reply; checks every quarter second whether the client has gone (then stops it)."""
    from omni_cli.pipeline import AudioChunk, Done

    audio: list[np.ndarray] = []
    iterator = events.__aiter__()
    pending: asyncio.Task[Any] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(iterator.__anext__())
            finished, _ = await asyncio.wait({pending}, timeout=0.25)
            if not finished:
                if await is_gone():
                    return None, audio, None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return None, audio, Failed("the reply ended without an answer.", 500, "model_error")
            pending = None
            if isinstance(event, Failed):
                return None, audio, event
            if isinstance(event, AudioChunk):
                audio.append(event.audio)
            elif isinstance(event, Done):
                return event, audio, None
    finally:
        if pending is not None:
            pending.cancel()  # the generator must have stopped running before it can be closed
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()


async def sse_chunks(events: AsyncIterator[Event | Waiting | Failed], shape: CompletionShape) -> AsyncIterator[str]:
    """The reply as server-sent events: text and audio deltas as they are made, then `[DONE]`."""
    from omni_cli.pipeline import AudioChunk, Done, TextDelta

    speak = shape.request.audio_format is not None
    stream = ReplyAudioStream(shape.sample_rate) if speak else None
    audio_ref = {"id": shape.audio_id}
    try:
        yield shape.chunk({"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, Waiting):
                # An SSE comment: clients skip it; a person reading the stream sees why nothing comes yet.
                yield f": waiting for the model ({event.ahead} repl{'y' if event.ahead == 1 else 'ies'} ahead)\n\n"
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(error_body(event.message, event.code, kind='server_error'))}\n\n"
                return
            elif isinstance(event, TextDelta):
                delta: dict[str, Any] = {"content": event.text}
                if speak:
                    delta["audio"] = {**audio_ref, "transcript": event.text}
                yield shape.chunk(delta)
            elif isinstance(event, AudioChunk) and stream is not None:
                samples = stream.push(event.audio)
                if samples.size:
                    yield shape.chunk({"audio": {**audio_ref, "data": encode_pcm16(samples)}})
            elif isinstance(event, Done):
                last: dict[str, Any] = {}
                if stream is not None:
                    tail = stream.finish()
                    last["audio"] = {**audio_ref, "expires_at": shape.transcripts.add(shape.audio_id, event.text)}
                    if tail.size:
                        last["audio"]["data"] = encode_pcm16(tail)
                yield shape.chunk(last, FINISH_REASONS[event.stopped])
                if shape.request.include_usage:
                    yield shape.chunk({}, usage=shape.usage(event))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
