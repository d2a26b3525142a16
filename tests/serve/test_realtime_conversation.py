"""`/v1/realtime` end to end: the official `openai` SDK talking to the conversation engine on the tiny model.

The server is `omni serve`'s app under uvicorn in this process (so a test can look at what a
session's conversation remembers); the client is the SDK's Realtime connection, streaming the
spoken questions in tests/data as a microphone would (PCM16 at 24 kHz, in real time). Replies
are kept short: `max_output_tokens`, or the tiny model whose replies end by themselves
(`stopping_pipeline`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("openai")

from realtime_client import RATE, RealtimeClient, delta_samples, pcm16_base64  # noqa: E402
from servers import realtime_server  # noqa: E402

from omni_cli.audio.io import SAMPLE_RATE, resample  # noqa: E402
from omni_cli.config import ChatOptions, ReplyOptions  # noqa: E402
from omni_cli.pipeline import Done, HistoryTurn  # noqa: E402
from omni_cli.serve.client_audio import ClientAudio  # noqa: E402
from omni_cli.serve.client_playback import ClientPlayback  # noqa: E402
from omni_cli.serve.response_gate import ResponseGate  # noqa: E402

LEAD_S = 0.3  # silence before a question, as a microphone opens before one speaks


@pytest.fixture(scope="module")
def stopping(stopping_pipeline):
    """A server whose replies end by themselves after a few tokens (`completed`)."""
    with realtime_server(stopping_pipeline) as running:
        yield running


@pytest.fixture(scope="module")
def endless(tiny_pipeline):
    """A server whose replies run to their token limit (`max_output_tokens` keeps them short)."""
    with realtime_server(tiny_pipeline) as running:
        yield running


def _spoken(question: np.ndarray, tail_s: float = 1.0) -> np.ndarray:
    return np.concatenate([np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32), question, np.zeros(int(tail_s * SAMPLE_RATE), np.float32)])


def _speech_bounds(audio: np.ndarray) -> tuple[int, int]:
    """The first and last sample of speech (above 2% of the peak)."""
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return int(loud[0]), int(loud[-1]) + 1


def _reply(pipeline, question, **options) -> Done:
    """The pipeline's own reply to `question`: what the server must send."""
    history = options.pop("history", ())
    return next(e for e in pipeline.respond(question, history, options=ReplyOptions(**options)) if isinstance(e, Done))


def _transcript(client: RealtimeClient, response_id: str) -> str:
    return "".join(e.delta for e in client.of("response.output_audio_transcript.delta") if e.response_id == response_id)


@pytest.mark.slow  # a question streamed in real time (~4 s)
def test_a_question_spoken_in_real_time_is_answered_in_text_and_speech(stopping, question_16k) -> None:
    server, _, ports = stopping
    question = question_16k[0]
    sent = _spoken(question)
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.stream(sent)
        done = client.wait_for("response.done")

    kinds = client.types()
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "response.created", "response.output_audio_transcript.delta", "response.output_audio.delta", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    started, stopped = client.wait_for("input_audio_buffer.speech_started"), client.wait_for("input_audio_buffer.speech_stopped")
    committed = client.wait_for("input_audio_buffer.committed")
    assert started.item_id == stopped.item_id == committed.item_id
    # Where the speech lies in the audio sent (ms at 24 kHz): a frame or two and the detectors' slack.
    onset, end = (b * 1000 / SAMPLE_RATE for b in _speech_bounds(sent))
    assert -100 < started.audio_start_ms - onset < 250, (started.audio_start_ms, onset)
    assert abs(stopped.audio_end_ms - end) < 150, (stopped.audio_end_ms, end)

    response = done.response
    assert response.status == "completed" and response.status_details is None
    (item,) = response.output
    text = _transcript(client, response.id)
    assert text and item.content[0].transcript == text == client.wait_for("response.output_audio_transcript.done").transcript
    samples = sum(delta_samples(e) for e in client.of("response.output_audio.delta"))
    assert samples > 0.1 * RATE
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 50  # the speech frames are most of the prompt
    # The conversation behind it remembers the turn: the reply, all of it heard.
    (kept,) = ports[-1].conversation.history.turns
    assert kept.reply == text and kept.user_speech is not None


@pytest.mark.slow  # two questions streamed in real time, the second over the first's reply
def test_speaking_over_a_reply_cancels_it_and_is_the_next_turn(endless, question_16k) -> None:
    server, _, ports = endless
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(max_output_tokens=80)  # about 4 s of speech: the client is still playing it
        client.wait_for("session.updated")
        client.stream(_spoken(question_16k[0], tail_s=0.0))
        silence = np.zeros(int(0.1 * SAMPLE_RATE), np.float32)
        while not client.of("response.output_audio.delta"):  # the microphone stays open: silence until the reply sounds
            client.stream(silence)
        # More than a second after the question: a new turn, not the question going on.
        client.stream(np.zeros(int(1.2 * SAMPLE_RATE), np.float32))
        client.stream(_spoken(question_16k[1]))
        first = client.wait_for("response.done")
        second = client.wait_for("response.done", count=2)

    assert first.response.status == "cancelled" and first.response.status_details.reason == "turn_detected"
    assert second.response.status == "incomplete" and second.response.status_details.reason == "max_output_tokens"
    cut_item = first.response.output[0].id
    speech = client.of("input_audio_buffer.speech_started")
    assert len(speech) == 2 and speech[1].item_id != speech[0].item_id
    # The reply stopped when the user spoke: no audio of it came after the speech was announced.
    events = client.events
    announced = next(t for t, e in events if e is speech[1])
    assert not [e for t, e in events if t > announced + 0.05 and e.type == "response.output_audio.delta" and e.item_id == cut_item]
    sent_ms = sum(delta_samples(e) for e in client.of("response.output_audio.delta") if e.item_id == cut_item) * 1000 / RATE
    # Remembered as far as it was played: a part of its text, not all of it.
    conversation = ports[-1].conversation
    cut_text = _transcript(client, first.response.id)
    assert conversation.history.turns[0].reply != cut_text and cut_text.startswith(conversation.history.turns[0].reply)
    assert sent_ms > 1000


def test_with_interrupt_response_off_speech_over_a_reply_is_not_heard(endless, question_16k) -> None:
    server, _, ports = endless
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(max_output_tokens=80, audio={"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}})
        client.wait_for("session.updated")
        _ask(client, "Talk.")
        client.wait_for("response.output_audio.delta")
        client.append(_spoken(question_16k[0]))  # while the reply plays (4 s of it)
        done = client.wait_for("response.done")
        time.sleep(1.0)
    assert done.response.status == "incomplete"  # it ran to its end
    assert "input_audio_buffer.speech_started" not in client.types() and ports[-1].conversation.turns == 1


def test_a_client_committed_turn_is_answered_on_response_create(stopping, stopping_pipeline, question_16k) -> None:
    server, _, _ = stopping
    question = question_16k[2]
    # What the server hears of it: the same audio through the same door (24 kHz PCM16 → 16 kHz frames, the last padded).
    door = ClientAudio(max_buffered_s=60)
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(audio={"input": {"turn_detection": None}})
        assert client.wait_for("session.updated").session.audio.input.turn_detection is None
        client.append(question)
        client.conn.input_audio_buffer.commit()
        committed = client.wait_for("input_audio_buffer.committed")
        time.sleep(0.5)
        assert "response.created" not in client.types()  # it waits for response.create
        client.conn.response.create(response={"instructions": "Answer in one word."})
        done = client.wait_for("response.done")
        client.conn.response.create()  # nothing new to answer
        error = client.wait_for("error", timeout=10)
    door.append(pcm16_base64(resample(question, SAMPLE_RATE, RATE)))
    door.flush()
    frames = []
    while (frame := door.read(timeout=0)) is not None:
        frames.append(frame)
    heard = np.concatenate(frames)
    expected = _reply(stopping_pipeline, heard, system="Answer in one word.")
    assert done.response.status == "completed"
    assert _transcript(client, done.response.id) == expected.text
    assert done.response.usage.input_tokens == expected.prompt_positions
    assert committed.item_id and error.error.code == "no_turn_to_answer"


def test_server_vad_s_silence_padding_and_threshold_are_the_endpointer_s(stopping, question_16k) -> None:
    server, _, ports = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        vad = {"type": "server_vad", "silence_duration_ms": 1500, "prefix_padding_ms": 200, "threshold": 0.6}
        client.update(audio={"input": {"turn_detection": vad}})
        client.wait_for("session.updated")
        client.append(_spoken(question_16k[0], tail_s=1.0))  # all at once: heard as fast as the endpointer runs
        client.wait_for("input_audio_buffer.speech_started")
        time.sleep(1.0)
        assert "input_audio_buffer.speech_stopped" not in client.types()  # 1 s of silence: the default 500 ms would end it
        client.append(np.zeros(SAMPLE_RATE, np.float32))
        client.wait_for("input_audio_buffer.speech_stopped")
        client.wait_for("response.done")
    config = ports[-1].conversation.listener.endpointer.config
    assert (config.hangover_ms, config.pre_roll_ms, config.start_threshold) == (1500, 200, 0.6)
    # A draft after omni chat's --speculate-ms of silence, as in omni chat.
    assert config.keep_threshold == pytest.approx(0.42) and config.pause_ms == ChatOptions.speculate_ms


def test_with_barge_in_on_and_the_default_silence_a_turn_is_answered_after_omni_chat_s_short_pause(stopping, question_16k) -> None:
    """As in `omni chat`: 350 ms of silence after the question (under the protocol's 500 ms) is enough
    for an answer while barge-in is on; the user going on would withdraw it (tested in the conversation)."""
    server, _, ports = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.append(_spoken(question_16k[0], tail_s=0.35))
        client.wait_for("input_audio_buffer.speech_stopped")
        client.wait_for("response.done")
    end = ports[-1].conversation.listener.endpointer
    assert end.hangover_ms == end.config.frames_for(ChatOptions.answer_after_ms) * end.config.frame_ms and end.config.hangover_ms == 500


def test_with_create_response_off_a_turn_server_vad_heard_waits_for_response_create(stopping, stopping_pipeline, question_16k) -> None:
    server, _, _ = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(audio={"input": {"turn_detection": {"type": "server_vad", "create_response": False}}})
        client.wait_for("session.updated")
        client.append(_spoken(question_16k[0]))  # all at once: heard as fast as the endpointer runs
        client.wait_for("input_audio_buffer.speech_stopped")
        client.wait_for("input_audio_buffer.committed")
        time.sleep(0.5)
        assert "response.created" not in client.types()
        client.conn.response.create()
        done = client.wait_for("response.done")
    assert done.response.status == "completed" and _transcript(client, done.response.id)


def _ask(client: RealtimeClient, text: str, **response) -> None:
    client.conn.conversation.item.create(item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    client.conn.response.create(**({"response": response} if response else {}))


def test_a_text_only_session_gets_text_replies(stopping, stopping_pipeline) -> None:
    server, _, _ = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(output_modalities=["text"])
        client.wait_for("session.updated")
        _ask(client, "hi")
        done = client.wait_for("response.done")
    text = "".join(e.delta for e in client.of("response.output_text.delta"))
    assert done.response.status == "completed" and text == _reply(stopping_pipeline, "hi", speak=False).text
    assert not client.of("response.output_audio.delta") and done.response.output[0].content[0].text == text


def test_a_response_s_own_modalities_and_token_limit_apply_to_it_alone(stopping, stopping_pipeline) -> None:
    """response.create's output_modalities and max_output_tokens were ignored: the reply was spoken
    and ran to the server's limit. They hold for that response; the session's settings for the next."""
    server, _, _ = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        _ask(client, "hi", output_modalities=["text"], max_output_tokens=3)
        short = client.wait_for("response.done")
        _ask(client, "hi again")
        spoken = client.wait_for("response.done", count=2)
        client.conn.send({"type": "response.create", "response": {"tools": [{"type": "function", "name": "f"}]}})
        refused = client.wait_for("error", timeout=10)
    assert short.response.status == "incomplete" and short.response.status_details.reason == "max_output_tokens"
    assert short.response.usage.output_tokens == 3 and short.response.output_modalities == ["text"]
    assert short.response.output[0].content[0].type == "output_text"
    assert not [e for e in client.of("response.output_audio.delta") if e.response_id == short.response.id]
    assert spoken.response.output_modalities == ["audio"] and spoken.response.usage.output_tokens > 3
    assert [e for e in client.of("response.output_audio.delta") if e.response_id == spoken.response.id]
    assert refused.error.param == "response.tools"


def test_instructions_are_the_system_prompt(stopping, stopping_pipeline) -> None:
    server, _, _ = stopping
    instructions = "You are a pirate. Answer in one word."
    plain, told = _reply(stopping_pipeline, "hi", speak=False), _reply(stopping_pipeline, "hi", system=instructions, speak=False)
    assert plain.text != told.text  # else this test could not tell
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(instructions=instructions)
        client.wait_for("session.updated")
        _ask(client, "hi")
        added = client.wait_for("conversation.item.added")
        done = client.wait_for("response.done")
    assert added.item.role == "user" and added.item.content[0].text == "hi"
    assert done.response.status == "completed"
    assert _transcript(client, done.response.id) == told.text


def test_the_beta_protocol_with_the_beta_header(stopping, stopping_pipeline) -> None:
    server, _, _ = stopping
    with RealtimeClient(server.base_url, beta=True) as client:
        client.wait_for("session.created")
        client.conn.conversation.item.create(item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
        client.wait_for("conversation.item.created")
        client.conn.response.create()
        done = client.wait_for("response.done")
    kinds = set(client.types())
    assert {"response.audio.delta", "response.audio_transcript.delta", "response.audio.done", "response.audio_transcript.done"} <= kinds
    assert not any(k.startswith("response.output_audio") or k == "conversation.item.added" for k in kinds)
    text = "".join(e.delta for e in client.of("response.audio_transcript.delta"))
    assert done.response.status == "completed" and text == _reply(stopping_pipeline, "hi").text


def test_truncate_keeps_in_the_history_only_what_the_client_played(endless, tiny_pipeline) -> None:
    server, _, ports = endless
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.update(max_output_tokens=30)
        client.wait_for("session.updated")
        _ask(client, "hi")
        first = client.wait_for("response.done")
        item = first.response.output[0].id
        client.conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=600)
        truncated = client.wait_for("conversation.item.truncated")
        _ask(client, "hi")
        second = client.wait_for("response.done", count=2)
    full = _transcript(client, first.response.id)
    heard = ports[-1].conversation.history.turns[0].reply
    assert (truncated.item_id, truncated.audio_end_ms) == (item, 600)
    assert heard and heard != full and full.startswith(heard)
    # The next answer was asked with that history, and only that.
    expected = _reply(tiny_pipeline, "hi", history=[HistoryTurn(None, "hi", heard)], sampling=_tokens(tiny_pipeline, 30))
    assert second.response.usage.input_tokens == expected.prompt_positions
    assert _transcript(client, second.response.id) == expected.text


def _tokens(pipeline, limit: int):
    from dataclasses import replace

    return replace(pipeline.streaming.sampling, max_new_tokens=limit)


def test_a_client_that_goes_away_mid_reply_frees_the_model_at_once(endless) -> None:
    server, slot, _ = endless
    client = RealtimeClient(server.base_url).__enter__()
    try:
        client.wait_for("session.created")
        _ask(client, "Talk.")  # up to 256 tokens: seconds of generation on this CPU
        client.wait_for("response.output_audio.delta")
        assert slot.busy and len(client.of("response.output_audio_transcript.delta")) < 100
    finally:
        client.close()
    gone = time.monotonic()
    while slot.busy:
        assert time.monotonic() - gone < 1.0, "the reply of a client that went away still holds the model"
        time.sleep(0.01)


def test_a_second_session_waits_its_turn_and_never_sees_the_first_one_s_history(endless, tiny_pipeline) -> None:
    server, _, _ = endless
    with RealtimeClient(server.base_url) as first, RealtimeClient(server.base_url) as second:
        first.wait_for("session.created")
        second.wait_for("session.created")
        first.update(max_output_tokens=5)
        _ask(first, "hi")
        first.wait_for("response.done")  # the first session now remembers a turn
        first.update(max_output_tokens=200)
        _ask(first, "Talk.")
        talking = first.wait_for("response.created", count=2).response.id
        first.wait_for("response.output_audio_transcript.delta", where=lambda e: e.response_id == talking)  # it holds the model
        second.update(max_output_tokens=5)
        _ask(second, "hi")
        waiting = second.wait_for("omni.response.waiting")
        done = second.wait_for("response.done")
    assert waiting.replies_ahead == 1
    expected = _reply(tiny_pipeline, "hi", sampling=_tokens(tiny_pipeline, 5))  # no history: a fresh conversation
    assert done.response.usage.input_tokens == expected.prompt_positions and _transcript(second, done.response.id) == expected.text


def test_beyond_max_waiting_a_session_s_reply_fails_with_one_line(tiny_pipeline) -> None:
    with realtime_server(tiny_pipeline, max_waiting=0) as (server, _, _):
        with RealtimeClient(server.base_url) as first, RealtimeClient(server.base_url) as second:
            first.wait_for("session.created")
            second.wait_for("session.created")
            first.update(max_output_tokens=200)
            _ask(first, "Talk.")
            first.wait_for("response.output_audio_transcript.delta")  # it holds the model; none may wait
            _ask(second, "hi")
            error = second.wait_for("error")
            done = second.wait_for("response.done")
    assert error.error.code == "reply_failed" and "the model is busy" in error.error.message
    assert done.response.status == "failed"


def test_response_cancel_stops_the_reply(endless) -> None:
    server, _, _ = endless
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        client.conn.response.cancel()  # nothing to cancel yet
        assert client.wait_for("error", timeout=10).error.code == "response_cancel_not_active"
        _ask(client, "Talk.")
        client.wait_for("response.output_audio.delta")
        client.conn.response.cancel()
        done = client.wait_for("response.done")
    assert done.response.status == "cancelled" and done.response.status_details.reason == "client_cancelled"
    assert done.response.usage.output_tokens < 256


def test_client_playback_counts_what_the_client_has_played() -> None:
    sent: list[int] = []

    class Replies:
        def reply_audio(self, chunk: np.ndarray, rate: int) -> None:
            sent.append(chunk.size)

    now = [100.0]
    sink = ClientPlayback(Replies(), 16000, clock=lambda: now[0])
    sink.play(np.zeros(16000, np.float32))
    sink.play(np.zeros(8000, np.float32))
    sink.finish()
    assert sent == [16000, 8000] and sink.first_audio_time == 100.0 and sink.playing
    now[0] += 1.0
    assert sink.heard_seconds == pytest.approx(1.0) and sink.playing
    now[0] += 1.0
    assert sink.heard_seconds == pytest.approx(1.5) and not sink.playing  # 1.5 s sent: played out
    sink.play(np.zeros(16000, np.float32))  # the next reply
    now[0] += 0.25
    sink.stop()
    now[0] += 5
    assert sink.heard_seconds == pytest.approx(0.25) and not sink.playing


def test_the_response_gate_lets_a_turn_go_per_response_create() -> None:
    gate = ResponseGate(poll_s=0.01)
    assert not gate.request(None)  # nothing committed, nothing coming
    gate.expect()
    assert gate.request("one word")  # the commit is on its way
    assert not gate.request(None)  # one turn, one response
    gate.committed()
    assert gate.wait(lambda: False) == (True, "one word")
    gate.expect()
    assert gate.request(None)
    gate.came_to_nothing()  # the commit was empty: the request lapses
    gate.expect()
    gate.committed()
    assert gate.wait(lambda: True) == (False, None)  # its client went away
    assert not gate.request(None)


def test_a_typed_question_too_long_for_the_budget_is_an_error_and_the_session_goes_on(stopping, stopping_pipeline) -> None:
    server, _, _ = stopping
    with RealtimeClient(server.base_url) as client:
        client.wait_for("session.created")
        _ask(client, "hello " * 8000)
        error = client.wait_for("error", timeout=10)  # at once: the model never runs on it
        failed = client.wait_for("response.done")
        _ask(client, "hi")
        done = client.wait_for("response.done", count=2)
    assert error.error.code == "context_length_exceeded"
    assert "16015 prompt positions" in error.error.message and "3840 fit beside a 256-token reply" in error.error.message  # stripped
    assert failed.response.status == "failed"
    assert done.response.status == "completed" and _transcript(client, done.response.id) == _reply(stopping_pipeline, "hi").text
