"""The FastAPI app of `omni serve`: the page, chat completions, the model list and the Realtime WebSocket.

`create_app(slot, options, port_factory)` wires them over one `ModelSlot` (one reply at a time,
in turn). Every request passes `access.refusal` first (API key, Host, Origin); bodies and
WebSocket messages have size limits; problems are answered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import html
import json
import threading
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from omni_cli.config import ServeOptions
from omni_cli.pipeline import QuestionTooLong
from omni_cli.serve.access import chosen_subprotocol, refusal, wants_beta
from omni_cli.serve.chat_completions import CompletionShape, collect, error_body, reply_events, sse_chunks
from omni_cli.serve.chat_request import AudioTranscripts, RequestError, parse_request
from omni_cli.serve.model_slot import ModelBusy, ModelSlot, SlotClosed
from omni_cli.serve.realtime_events import SessionConfig
from omni_cli.serve.realtime_session import PortFactory, RealtimeSession

# The page's files, served from the package (no CDN, no build step): name → content type.
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "mic-worklet.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
# What the page's files may load and connect to: this server only.
PAGE_POLICY = "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; img-src 'self' data:"


class AccessCheck:
    """Refuses an HTTP request that `access.refusal` refuses (API key, Host, Origin) before the app sees it.

    A plain ASGI middleware on purpose: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware)
    wraps `receive` so that `request.is_disconnected()` never turns true, and a non-streamed
    request whose client went away would keep its place in the model's queue.
    """

    def __init__(self, app: ASGIApp, options: ServeOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a refused HTTP request here; pass everything else on untouched (the WebSocket checks itself)."""
        if scope["type"] == "http":
            request = Request(scope)
            refused = refusal(self.options, request.headers, request.query_params)
            if refused is not None:
                status, message = refused
                body = error_body(message, "forbidden" if status == 403 else "invalid_api_key")
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _page_file(name: str) -> bytes:
    return resources.files("omni_cli.serve").joinpath("page", name).read_bytes()


def create_app(slot: ModelSlot, options: ServeOptions, port_factory: PortFactory) -> FastAPI:
    """The server's app over a loaded pipeline (in `slot`); `port_factory` gives each Realtime session its conversation."""
    app = FastAPI(title="omni serve", docs_url=None, redoc_url=None, openapi_url=None)
    pipeline = slot.pipeline
    transcripts = AudioTranscripts(options.audio_ttl_s)
    defaults = pipeline.streaming.sampling
    can_speak = pipeline.sample_rate is not None and pipeline.model.unit_decoder is not None

    app.add_middleware(AccessCheck, options=options)

    @app.get("/")
    async def page(request: Request) -> Response:
        # The page's own files need the key too (every request does): it rides on their URLs.
        key = request.query_params.get("key")
        query = html.escape(f"?key={quote(key, safe='')}") if options.api_key and key else ""
        text = _page_file("index.html").decode("utf-8").replace("{{key_query}}", query)
        return Response(text, media_type=PAGE_FILES["index.html"], headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/page/{name}")
    async def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            return JSONResponse(error_body(f"no page file {name!r}", "not_found"), status_code=404)
        return Response(_page_file(name), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0, "owned_by": "omni"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, options.max_request_bytes)
        if isinstance(body, Response):
            return body
        try:
            parsed = parse_request(
                body, defaults, defaults.max_new_tokens, pipeline.context_budget, transcripts, can_speak
            )
        except RequestError as exc:
            return JSONResponse(error_body(str(exc), "invalid_value", exc.param), status_code=exc.status)
        try:
            # Before queueing for the model: a question the budget cannot hold is refused at once.
            pipeline.check_question(parsed.question, parsed.options)
        except QuestionTooLong as exc:
            return JSONResponse(error_body(str(exc), "context_length_exceeded", "messages"), status_code=400)
        try:
            # A stream's status goes out with its first byte: a full queue is refused before that.
            slot.check_room()
        except ModelBusy as exc:
            return JSONResponse(error_body(str(exc), "model_busy", kind="server_error"), status_code=503)
        except SlotClosed as exc:
            return JSONResponse(error_body(str(exc), "server_stopping", kind="server_error"), status_code=503)
        shape = CompletionShape(parsed, options.model_name, pipeline.sample_rate, transcripts)
        cancelled = threading.Event()
        events = reply_events(slot, parsed, cancelled)
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse_chunks(events, shape), media_type="text/event-stream", headers=headers)
        done, audio, failed = await collect(events, request.is_disconnected)
        if failed is not None:
            return JSONResponse(error_body(failed.message, failed.code, kind="server_error"), status_code=failed.status)
        if done is None:  # the client went away
            return Response(status_code=499)
        return JSONResponse(shape.body(done, audio))

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        refused = refusal(options, websocket.headers, websocket.query_params)
        if refused is not None:
            # Before accepting: the handshake itself is refused (HTTP 403), nothing is streamed.
            await websocket.close(code=1008, reason=refused[1][:120])
            return
        await websocket.accept(subprotocol=chosen_subprotocol(websocket.headers))
        await _realtime_session(websocket, options, port_factory)

    return app


async def _read_body(request: Request, limit: int) -> Any:
    """The JSON body, read at most `limit` bytes far; an error Response when too large or not JSON."""
    declared = request.headers.get("content-length")
    too_large = JSONResponse(
        error_body(f"the request is larger than {limit // (1024 * 1024)} MiB; send shorter audio.", "request_too_large"), status_code=413
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return JSONResponse(error_body(f"the body is not valid JSON ({exc}).", "invalid_json"), status_code=400)


async def _realtime_session(websocket: WebSocket, options: ServeOptions, port_factory: PortFactory) -> None:
    """Run one Realtime connection: a sender task draining the event queue, the receive loop handling client events."""
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def send(event: dict[str, Any]) -> None:
        # Called from the event loop and from the conversation's thread alike.
        try:
            loop.call_soon_threadsafe(outbox.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    async def sender() -> None:
        while (event := await outbox.get()) is not None:
            await websocket.send_text(json.dumps(event))

    session = RealtimeSession(
        send, port_factory, SessionConfig(model=options.model_name), options.max_buffered_s, beta=wants_beta(websocket.headers)
    )
    sending = asyncio.create_task(sender())
    try:
        session.start()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                session.error("send client events as JSON text messages, not binary.", "invalid_event")
                continue
            if len(text) > options.max_message_bytes:
                session.error(
                    f"the message is {len(text)} bytes; at most {options.max_message_bytes} are read (send audio in smaller appends).",
                    "message_too_large",
                )
                continue
            session.handle(text)
    except WebSocketDisconnect:
        pass
    finally:
        session.close()  # the conversation stops at once: the model is free for the others
        outbox.put_nowait(None)
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)


def ready_line(host: str, port: int, api_key: str | None) -> str:
    """The one line `omni serve` prints when it is ready: the page's URL and the API base URL."""
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"  # what this machine's browser can open; other machines use this machine's address
    key = "?key=YOUR_KEY" if api_key else ""
    return f"omni serve: ready - the page: http://{shown}:{port}/{key}  API base URL: http://{shown}:{port}/v1"

