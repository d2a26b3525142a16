"""`POST /v1/chat/completions` and `GET /v1/models` of a real `omni serve`, through the official `openai` package.

The tiny model is greedy and deterministic, so every reply is compared with what the pipeline
itself says for the same question, history and options: the server must add nothing and lose nothing.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai")

from omni_cli.audio.io import load_audio, resample  # noqa: E402
from omni_cli.config import ReplyOptions, SamplingConfig  # noqa: E402
from omni_cli.pipeline import AudioChunk, Done, HistoryTurn  # noqa: E402


def _client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def _expected(pipeline, question, history=(), **options) -> tuple[str, np.ndarray, Done]:
    options.setdefault("sampling", SamplingConfig(max_new_tokens=options.pop("max_tokens", 256)))
    events = list(pipeline.respond(question, list(history), None, ReplyOptions(**options)))
    audio = [e.audio for e in events if isinstance(e, AudioChunk)]
    done = events[-1]
    assert isinstance(done, Done)
    return done.text, (np.concatenate(audio) if audio else np.zeros(0, np.float32)), done


def _wav_b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _pcm16_24k(audio_16k: np.ndarray) -> bytes:
    return (np.clip(resample(audio_16k, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


def _field(audio, name: str):
    """A streamed delta's audio field: a dict in older SDKs, a model in newer ones."""
    if audio is None:
        return None
    return audio.get(name) if isinstance(audio, dict) else getattr(audio, name, None)


def test_models_lists_the_served_model(tiny_server) -> None:
    models = _client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["llama-omni"]


def test_a_text_question_is_answered_by_the_llm_in_text(tiny_server, tiny_pipeline) -> None:
    messages = [{"role": "system", "content": "You rewrite questions."}, {"role": "user", "content": "Say hello."}]
    reply = _client(tiny_server).chat.completions.create(model="llama-omni", messages=messages, max_tokens=12)
    text, _, done = _expected(tiny_pipeline, "Say hello.", system="You rewrite questions.", speak=False, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.content == text and text
    assert choice.message.audio is None
    assert choice.finish_reason == ("length" if done.stopped == "budget" else "stop")
    assert reply.usage.completion_tokens == done.tokens
    assert reply.usage.prompt_tokens == done.prompt_positions
    # The system message is the system prompt: the reference's gives another prompt.
    _, _, plain = _expected(tiny_pipeline, "Say hello.", speak=False, max_tokens=12)
    assert plain.prompt_positions != done.prompt_positions


def test_earlier_turns_become_the_history(tiny_server, tiny_pipeline) -> None:
    messages = [
        {"role": "user", "content": "First question."},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question."},
    ]
    reply = _client(tiny_server).chat.completions.create(model="llama-omni", messages=messages, max_tokens=10)
    history = [HistoryTurn(None, "First question.", "First answer.")]
    text, _, done = _expected(tiny_pipeline, "Second question.", history, speak=False, max_tokens=10)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == done.prompt_positions


def test_temperature_and_seed_are_honoured(tiny_server) -> None:
    client = _client(tiny_server)
    ask = lambda seed: client.chat.completions.create(  # noqa: E731
        model="llama-omni", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=1.5, seed=seed
    ).choices[0].message.content
    first, again, other = ask(1), ask(1), ask(2)
    assert first == again
    assert first != other


def test_a_spoken_question_gets_text_and_wav_speech(tiny_server, tiny_pipeline, question_wavs) -> None:
    reply = _client(tiny_server).chat.completions.create(
        model="llama-omni",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _wav_b64(question_wavs[0]), "format": "wav"}}]}],
        max_tokens=24,
    )
    text, audio, _ = _expected(tiny_pipeline, load_audio(question_wavs[0]), max_tokens=24)
    message = reply.choices[0].message
    assert message.content == text == message.audio.transcript
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > time.time()
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 16000 and audio.size > 0
    np.testing.assert_allclose(samples, np.clip(audio, -1, 1), atol=1.5 / 32768)


def test_streamed_speech_is_the_same_reply_as_pcm16(tiny_server, question_wavs) -> None:
    client = _client(tiny_server)
    pcm = base64.b64encode(_pcm16_24k(load_audio(question_wavs[1]))).decode()
    request = dict(
        model="llama-omni",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": pcm, "format": "pcm16"}}]}],
        max_tokens=24,
    )
    whole = client.chat.completions.create(**request).choices[0].message
    data, transcript, content, finish, chunks = b"", "", "", None, 0
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == 24
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        audio = getattr(delta, "audio", None)
        transcript += _field(audio, "transcript") or ""
        if _field(audio, "data"):
            data += base64.b64decode(_field(audio, "data"))
            chunks += 1
        finish = chunk.choices[0].finish_reason or finish
    assert content == transcript == whole.content
    assert finish == "length"
    assert chunks >= 2  # spoken while generated, not in one piece at the end
    assert data == base64.b64decode(whole.audio.data)  # PCM16 at 24 kHz, joined without seams


def test_a_reply_s_audio_id_continues_the_conversation(tiny_server, question_wavs) -> None:
    client = _client(tiny_server)
    question = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _wav_b64(question_wavs[0]), "format": "wav"}}]}
    first = client.chat.completions.create(
        model="llama-omni", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, messages=[question], max_tokens=8
    ).choices[0].message
    by_id = [question, {"role": "assistant", "audio": {"id": first.audio.id}}, {"role": "user", "content": "And then?"}]
    by_text = [question, {"role": "assistant", "content": first.audio.transcript}, {"role": "user", "content": "And then?"}]
    ask = lambda messages: client.chat.completions.create(model="llama-omni", messages=messages, max_tokens=8)  # noqa: E731
    assert ask(by_id).choices[0].message.content == ask(by_text).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="unknown or expired"):
        ask([question, {"role": "assistant", "audio": {"id": "audio_nosuch"}}, {"role": "user", "content": "And then?"}])


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}, "stop is not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]}, "not valid base64"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "not a readable wav"),
        ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"], "audio": {"format": "wav"}, "stream": True}, "pcm16"),
    ],
)
def test_requests_omni_cannot_answer_are_refused_by_name(tiny_server, request_fields, message) -> None:
    response = httpx.post(f"{tiny_server.base_url}/chat/completions", json={"model": "llama-omni", **request_fields}, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_malformed_json_is_a_400(tiny_server) -> None:
    response = httpx.post(f"{tiny_server.base_url}/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_concurrent_requests_take_turns_and_each_gets_its_own_reply(tiny_server, tiny_pipeline) -> None:
    client = _client(tiny_server)
    questions = ["One.", "Two, longer question.", "Three?"]
    answers: dict[str, str] = {}

    def ask(q: str) -> None:
        answers[q] = client.chat.completions.create(model="llama-omni", messages=[{"role": "user", "content": q}], max_tokens=20).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for q in questions:
        assert answers[q] == _expected(tiny_pipeline, q, speak=False, max_tokens=20)[0]


def test_a_client_that_goes_away_mid_reply_frees_the_model(tiny_server) -> None:
    client = _client(tiny_server)
    long_request = {"model": "llama-omni", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 1024, "stream": True}

    def short_request_s() -> float:
        start = time.monotonic()
        client.chat.completions.create(model="llama-omni", messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
        return time.monotonic() - start

    idle_s = short_request_s()  # what a short request costs on a free model (a busy machine makes it vary)
    start = time.monotonic()
    full = list(client.chat.completions.create(**long_request))
    full_s = time.monotonic() - start
    assert len(full) > 500
    with httpx.stream("POST", f"{tiny_server.base_url}/chat/completions", json=long_request, timeout=60) as response:
        for _ in zip(range(3), response.iter_lines()):  # the role line, then text: the model is held
            pass
    # The stream was closed mid-reply: the next request gets the model at once, not when the reply would have ended.
    waited_s = short_request_s() - idle_s
    assert waited_s < full_s / 4, f"the abandoned reply held the model {waited_s:.2f} s (a full reply takes {full_s:.2f} s)"


def test_a_request_that_must_wait_is_told_so_and_one_too_many_is_refused(tiny_pipeline) -> None:
    from omni_cli.config import ServeOptions
    from omni_cli.serve.app import create_app
    from omni_cli.serve.model_slot import ModelSlot
    from omni_cli.serve.realtime_conversation import conversation_ports
    from servers import app_server

    slot = ModelSlot(tiny_pipeline, max_waiting=1)
    app = create_app(slot, ServeOptions(max_waiting=1), conversation_ports(slot))
    long_request = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 256, "stream": True}
    with app_server(app) as server, httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.base_url}/chat/completions", json=long_request) as first:
            lines = first.iter_lines()
            for _ in zip(range(3), lines):  # the first reply holds the model
                pass
            with http.stream("POST", f"{server.base_url}/chat/completions", json={**long_request, "max_tokens": 2}) as second:
                second_lines = second.iter_lines()
                head = [line for _, line in zip(range(3), second_lines)]  # the role line, a blank, then the notice
                assert head[-1] == ": waiting for the model (1 reply ahead)", head
                refused = http.post(f"{server.base_url}/chat/completions", json={**long_request, "stream": False})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "model_busy"
                assert "the model is busy" in refused.json()["error"]["message"]
                for _ in lines:  # the first reply goes on to its end, then the second gets the model
                    pass
                rest = [line for line in second_lines if line]
            assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]


@pytest.mark.parametrize("stream", [False, True])
def test_a_question_too_long_for_the_context_budget_is_refused_at_once(tiny_server, stream: bool) -> None:
    # 48,000 characters: about 16,016 prompt positions, far over what the default budget of 4096 holds.
    client = _client(tiny_server)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as refused:
        reply = client.chat.completions.create(
            model="llama-omni", messages=[{"role": "user", "content": "hello " * 8000}], max_tokens=8, stream=stream
        )
        list(reply) if stream else reply
    took_s = time.monotonic() - start
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    message = error["message"]
    assert "\n" not in message and "16016 prompt positions" in message and "4088 fit beside a 8-token reply" in message
    assert "shorten the question" in message
    assert took_s < 3, f"refusing took {took_s:.1f} s: the model ran"  # the prefill of that prompt takes minutes on this CPU
    # A long system message counts too; a question that fits is answered as before.
    with pytest.raises(openai.BadRequestError, match="prompt positions"):
        client.chat.completions.create(
            model="llama-omni", messages=[{"role": "system", "content": "x" * 13000}, {"role": "user", "content": "hi"}], max_tokens=8
        )
    assert client.chat.completions.create(model="llama-omni", messages=[{"role": "user", "content": "hello " * 100}], max_tokens=2).choices


def test_a_waiting_request_whose_client_goes_away_leaves_the_queue(tiny_pipeline) -> None:
    from omni_cli.config import ServeOptions
    from omni_cli.serve.app import create_app
    from omni_cli.serve.model_slot import ModelSlot
    from omni_cli.serve.realtime_conversation import conversation_ports
    from servers import app_server

    slot = ModelSlot(tiny_pipeline, max_waiting=2)
    app = create_app(slot, ServeOptions(max_waiting=2), conversation_ports(slot))
    short = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    with app_server(app) as server, httpx.Client(timeout=60) as http, slot.hold():  # a long reply holds the model
        for _ in range(2):  # as `curl -m 1`: two clients give up waiting for a reply that is not streamed
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.base_url}/chat/completions", json=short, timeout=1)
        time.sleep(0.5)  # the server looks for a closed connection every quarter second
        # Nobody waits any more: the next request queues behind the reply in progress alone; it is not refused.
        with http.stream("POST", f"{server.base_url}/chat/completions", json={**short, "stream": True}) as next_one:
            head = [line for _, line in zip(range(3), next_one.iter_lines())]
        assert next_one.status_code == 200
        assert head[-1] == ": waiting for the model (1 reply ahead)", head


def test_a_streamed_request_beyond_the_queue_is_refused_with_a_503(tiny_pipeline) -> None:
    from omni_cli.config import ServeOptions
    from omni_cli.serve.app import create_app
    from omni_cli.serve.model_slot import ModelSlot
    from omni_cli.serve.realtime_conversation import conversation_ports
    from servers import app_server

    slot = ModelSlot(tiny_pipeline, max_waiting=0)
    app = create_app(slot, ServeOptions(max_waiting=0), conversation_ports(slot))
    with app_server(app) as server, slot.hold():  # a reply holds the model, and no one may wait
        client = _client(server)
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="llama-omni", messages=[{"role": "user", "content": "Hi."}], max_tokens=2, stream=True)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "model_busy" and "the model is busy" in refused.value.body["message"]
