"""The Realtime protocol layer of `/v1/realtime`: sessions, the audio buffer, errors, GA and beta names.

Against a real `omni serve` through the official `openai` package where the SDK can say it, and
raw WebSocket messages where it cannot (malformed JSON). The server events `RealtimeReplies`
builds for a conversation are validated against the SDK's own types, GA and beta.
"""

from __future__ import annotations

import base64
import json
import typing
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter
from websockets.sync.client import connect

openai = pytest.importorskip("openai")

from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent  # noqa: E402
from openai.types.realtime import RealtimeServerEvent  # noqa: E402

from omni_cli.serve.client_audio import BufferFull, ClientAudio  # noqa: E402
from omni_cli.serve.realtime_events import ClientError, SessionConfig  # noqa: E402
from omni_cli.serve.realtime_session import RealtimeSession  # noqa: E402



def _by_type(union: Any) -> dict[str, Any]:
    """The SDK's server event classes by their `type` (the beta union has no discriminator to report errors by)."""
    args = typing.get_args(union)
    if typing.get_origin(union) is typing.Annotated:
        args = typing.get_args(args[0])
    return {typing.get_args(cls.model_fields["type"].annotation)[0]: TypeAdapter(cls) for cls in args if isinstance(cls, type)}


GA = _by_type(RealtimeServerEvent)
BETA = _by_type(BetaServerEvent)


def _pcm16_b64(seconds: float, freq: float = 220.0, rate: int = 24000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    return base64.b64encode((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()).decode()


def _next(conn, kind: str) -> Any:
    for event in conn:
        if event.type == kind:
            return event
        assert event.type != "error", event
    raise AssertionError(f"no {kind}")


def test_session_created_and_updated_in_the_ga_shape(tiny_server) -> None:
    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0)
    with client.realtime.connect(model="llama-omni") as conn:
        created = _next(conn, "session.created")
        assert created.session.audio.input.format.rate == 24000
        assert created.session.audio.input.turn_detection.type == "server_vad"
        conn.session.update(session={
            "type": "realtime",
            "instructions": "Answer in one word.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 700, "prefix_padding_ms": 200, "threshold": 0.6}}},
        })
        updated = _next(conn, "session.updated")
        detection = updated.session.audio.input.turn_detection
        assert (detection.silence_duration_ms, detection.prefix_padding_ms, detection.threshold) == (700, 200, 0.6)
        assert updated.session.instructions == "Answer in one word."
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        assert _next(conn, "session.updated").session.audio.input.turn_detection is None


def test_errors_are_events_and_the_connection_goes_on(tiny_server) -> None:
    url = tiny_server.base_url.replace("http://", "ws://") + "/realtime"
    with connect(url, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        sent = [
            ("{not json", "invalid_json"),
            (json.dumps({"type": "no.such.event"}), "unknown_event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_audio"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}), "invalid_audio"),
            (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}), "unsupported_audio_format"),
            (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nosuch", "content_index": 0, "audio_end_ms": 10}), "item_not_found"),
            ("x" * (4 * 1024 * 1024 + 10), "message_too_large"),
        ]
        for message, code in sent:
            ws.send(message)
            event = json.loads(ws.recv(timeout=10))
            assert (event["type"], event["error"]["code"]) == ("error", code), event
        # Still the same session: good audio is taken without a word.
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm16_b64(0.5)}))
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": "still here"}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"


def test_a_beta_client_gets_the_beta_session(tiny_server) -> None:
    # The beta client always builds a wss:// URL from base_url; websocket_base_url is the SDK's way round that.
    ws_base = tiny_server.base_url.replace("http://", "ws://")
    client = openai.OpenAI(base_url=tiny_server.base_url, websocket_base_url=ws_base, api_key="unused", max_retries=0)
    with client.beta.realtime.connect(model="llama-omni") as conn:
        created = _next(conn, "session.created")
        assert created.session.input_audio_format == "pcm16"
        assert created.session.turn_detection.type == "server_vad"
        conn.session.update(session={"turn_detection": {"type": "server_vad", "silence_duration_ms": 900}})
        assert _next(conn, "session.updated").session.turn_detection.silence_duration_ms == 900


class _Port:
    """Records what the session asks of its conversation."""

    def __init__(self, session) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


@pytest.mark.parametrize("beta", [False, True])
def test_a_conversation_s_events_are_valid_realtime_events(beta: bool) -> None:
    sent: list[dict] = []
    session = RealtimeSession(sent.append, _Port, SessionConfig(), max_buffered_s=10, beta=beta)
    session.start()
    session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm16_b64(1.0)}))
    replies = session.replies
    replies.speech_started(0.0)
    replies.speech_stopped(1e12)
    user_item = replies.committed()
    replies.waiting(1)
    response_id = replies.reply_started()
    replies.reply_text("Hello")
    replies.reply_audio(np.zeros(1600, np.float32), 16000)
    replies.reply_text(" there.")
    replies.reply_audio(np.full(1600, 0.1, np.float32), 16000)
    item = replies.reply_item
    replies.reply_done("completed", input_tokens=50, output_tokens=4)
    session.handle(json.dumps({"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": 150}))
    replies.truncated(item, 150)

    adapter = BETA if beta else GA
    kinds = []
    for event in sent:
        if event["type"] == "omni.response.waiting":  # omni's own; SDKs pass unknown types through
            continue
        if beta and "session" in event:
            # The beta types list OpenAI's model names only; the SDK reads events unchecked, so "llama-omni" passes there.
            event = {**event, "session": {k: v for k, v in event["session"].items() if k != "model"}}
        adapter[event["type"]].validate_python(event)
        kinds.append(event["type"])
    delta = "response.audio.delta" if beta else "response.output_audio.delta"
    assert kinds[0] == "session.created"
    assert kinds.count(delta) >= 2
    assert kinds[-2:] == ["response.done", "conversation.item.truncated"]
    done = next(e for e in sent if e["type"] == "response.done")["response"]
    assert done["id"] == response_id and done["status"] == "completed"
    assert done["output"][0]["content"][0]["transcript"] == "Hello there."
    assert done["usage"]["total_tokens"] == 54
    committed = next(e for e in sent if e["type"] == "input_audio_buffer.committed")
    assert committed["item_id"] == user_item
    stopped = next(e for e in sent if e["type"] == "input_audio_buffer.speech_stopped")
    assert stopped["audio_end_ms"] == 990  # the last whole 30 ms frame of the 1 s appended
    audio = b"".join(base64.b64decode(e["delta"]) for e in sent if e["type"] == delta)
    assert len(audio) // 2 == 2 * 1600 * 24000 // 16000  # 0.2 s at 24 kHz, nothing lost at the seams
    assert session.port.calls[-1] == ("truncate", item, 150)


def test_truncating_past_the_audio_sent_is_an_error() -> None:
    sent: list[dict] = []
    session = RealtimeSession(sent.append, _Port, SessionConfig(), max_buffered_s=10)
    session.start()
    session.replies.reply_started()
    session.replies.reply_audio(np.zeros(1600, np.float32), 16000)
    item = session.replies.reply_item
    with pytest.raises(ClientError, match="past the"):
        session.replies.check_truncate(item, 5000)


def test_client_audio_becomes_timed_16k_frames_without_seams() -> None:
    clock = iter(range(100)).__next__
    audio = ClientAudio(max_buffered_s=5, clock=lambda: float(clock()))
    rate = 24000
    t = np.arange(rate) / rate
    signal = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    for block in np.array_split(signal, 7):  # appends of uneven sizes
        audio.append(base64.b64encode(block.tobytes()).decode())
    frames = []
    while (frame := audio.read(timeout=0)) is not None:
        frames.append((frame, audio.frame_end_t))
    assert all(f.size == 480 for f, _ in frames)
    from omni_cli.audio.io import resample

    whole = resample(signal.astype(np.float32) / 32768, 24000, 16000)
    joined = np.concatenate([f for f, _ in frames])
    np.testing.assert_allclose(joined, whole[: joined.size], atol=1e-5)
    assert [t for _, t in frames] == sorted(t for _, t in frames)  # stamped with the append that completed them
    assert audio.stream_ms_at(frames[-1][1]) <= 990 and audio.received_ms == 1000
    # A commit's flush: the partial last frame (1 s at 16 kHz is 33 frames and 160 samples) padded with silence.
    audio.flush()
    last = audio.read(timeout=0)
    assert last.size == 480 and np.array_equal(last[160:], np.zeros(320)) and np.abs(last[:160]).max() > 0.1
    assert audio.frame_end_t == frames[-1][1] and audio.read(timeout=0) is None
    audio.flush()  # nothing partial left
    assert audio.read(timeout=0) is None
    with pytest.raises(BufferFull):
        audio.append(base64.b64encode(np.zeros(6 * rate, "<i2").tobytes()).decode())
    assert audio.clear() == 0 and audio.read(timeout=0) is None
