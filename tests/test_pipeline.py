"""The streaming pipeline: events in the right order, and streaming equal to offline decoding."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from omni_cli.audio.io import load_audio
from omni_cli.config import SamplingConfig, StreamingConfig
from omni_cli.model.llm import build_prompt_ids, generate, speech_turn, splice_speech
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.pipeline import AudioChunk, Done, History, HistoryTurn, SpeechToSpeech, StageClock, TextDelta, Units


@pytest.fixture(scope="module")
def vocoder(tiny_model):
    return load_vocoder(tiny_model.vocoder_dir)


def _pipeline(tiny_loaded, vocoder, **kw) -> SpeechToSpeech:
    sampling = SamplingConfig(max_new_tokens=kw.pop("max_new_tokens", 24), ignore_stop=True)
    return SpeechToSpeech(tiny_loaded, vocoder, StreamingConfig(sampling=sampling, **kw))


@pytest.mark.parametrize("chunk_units,first_chunk_units", [(40, None), (10, 4), (1, None)])
def test_streamed_units_equal_offline_decoding_of_the_whole_reply(
    tiny_loaded, vocoder, question_wavs, chunk_units: int, first_chunk_units: int | None
) -> None:
    pipe = _pipeline(tiny_loaded, vocoder, chunk_units=chunk_units, first_chunk_units=first_chunk_units)
    audio = load_audio(question_wavs[0])
    events = list(pipe.respond(audio))
    done = events[-1]
    assert isinstance(done, Done) and done.tokens == 24

    # Offline: regenerate the same reply's hidden states and decode them in one pass.
    m = tiny_loaded
    ids = build_prompt_ids(m.tokenizer, [speech_turn()])
    embeds = splice_speech(m.llm.get_input_embeddings(), ids, [pipe.encode_speech(audio)])
    hidden = torch.stack([t.hidden for t in generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=24))])
    offline = m.unit_decoder.predict_units(hidden)
    assert len(offline) > 20
    assert done.units == offline
    assert [u for e in events if isinstance(e, Units) for u in e.units] == offline

    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.sample_rate == 16000 and c.audio.dtype == np.float32 for c in chunks)
    if first_chunk_units:
        # The first chunk is rendered as soon as the smaller threshold is met.
        assert len(chunks) >= 2


def test_first_audio_arrives_before_the_last_text(tiny_loaded, vocoder, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, vocoder, chunk_units=10, max_new_tokens=30)
    events = list(pipe.respond(load_audio(question_wavs[1])))
    kinds = [type(e).__name__ for e in events]
    first_audio = kinds.index("AudioChunk")
    last_text = len(kinds) - 1 - kinds[::-1].index("TextDelta")
    assert first_audio < last_text
    stamps = [e.t for e in events]
    assert stamps == sorted(stamps)


def test_streamed_audio_matches_whole_reply_synthesis_away_from_seams(tiny_loaded, vocoder, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, vocoder, chunk_units=12)
    events = list(pipe.respond(load_audio(question_wavs[2])))
    streamed = np.concatenate([e.audio for e in events if isinstance(e, AudioChunk)])
    units = events[-1].units
    whole = vocoder.synthesize(units).detach().numpy()
    # Durations near a seam may differ by a frame or so; lengths stay within a few frames a seam.
    n_seams = sum(isinstance(e, AudioChunk) for e in events) - 1
    hop = vocoder.config.hop_length
    assert abs(len(streamed) - len(whole)) <= 2 * hop * max(n_seams, 1)
    # The opening chunk has no seam to its left: it equals whole-reply synthesis up to near its end.
    first = next(e.audio for e in events if isinstance(e, AudioChunk))
    head = len(first) - 8 * hop
    assert head > 0
    np.testing.assert_allclose(first[:head], whole[:head], atol=1e-4)


def test_events_carry_the_stage_timings_of_the_work_that_produced_them(tiny_loaded, vocoder, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, vocoder, chunk_units=10, max_new_tokens=20)
    start = time.monotonic()
    events = list(pipe.respond(load_audio(question_wavs[0])))
    wall_ms = (time.monotonic() - start) * 1000
    done = events[-1]
    t = done.timings
    assert min(t.features_ms, t.encoder_ms, t.adaptor_ms, t.prefill_ms) > 0
    # One prefill, then one LLM step per later token; the speech decoder runs on every token's hidden state.
    assert len(t.llm_steps_ms) == done.tokens - 1 == 19 and len(t.decoder_steps_ms) == done.tokens
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2 and [c.vocoder_ms for c in chunks] == t.vocoder_ms and min(t.vocoder_ms) > 0
    assert [c.tokens for c in chunks] == sorted(c.tokens for c in chunks) and chunks[-1].tokens == done.tokens
    # The first chunk waited for its 10 units: the decoder steps up to it emitted them.
    units_before_first = sum(len(e.units) for e in events[: events.index(chunks[0])] if isinstance(e, Units))
    assert units_before_first >= 10 and 1 <= chunks[0].tokens < done.tokens
    assert {d.llm_ms for d in events if isinstance(d, TextDelta)} <= {t.prefill_ms, *t.llm_steps_ms}
    assert {u.decoder_ms for u in events if isinstance(u, Units)} <= set(t.decoder_steps_ms)
    stages = t.features_ms + t.encoder_ms + t.adaptor_ms + t.prefill_ms + sum(t.llm_steps_ms + t.decoder_steps_ms + t.vocoder_ms)
    assert stages <= wall_ms
    typed = list(pipe.respond("Hello there."))[-1].timings
    assert typed.features_ms == typed.encoder_ms == typed.adaptor_ms == 0 and typed.prefill_ms > 0


@pytest.mark.parametrize("synchronize", [False, True])
def test_stage_timings_wait_for_the_gpu_only_when_asked(tiny_loaded, monkeypatch: pytest.MonkeyPatch, synchronize: bool) -> None:
    """Replies do not pay for synchronization: a clock that believes it runs on CUDA waits only with synchronize=True."""
    waits: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    pipe = _pipeline(tiny_loaded, None, max_new_tokens=3)
    assert not pipe.clock.synchronize  # the default, and what a CPU gets even when asked
    pipe.clock = StageClock(torch.device("cuda"), synchronize=synchronize)
    done = list(pipe.respond(np.zeros(16000, np.float32)))[-1]
    assert done.tokens == 3
    # Two readings for each of features, encoder, adaptor, prefill and the two later steps, and the end of generation.
    assert len(waits) == (2 * 7 if synchronize else 0)


def test_text_only_without_vocoder_and_interruption(tiny_loaded, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, None, max_new_tokens=40)
    seen = {"n": 0}

    def stop_after_five() -> bool:
        return seen["n"] >= 5

    events = []
    for e in pipe.respond(load_audio(question_wavs[0]), should_stop=stop_after_five):
        events.append(e)
        if isinstance(e, TextDelta):
            seen["n"] += 1
    done = events[-1]
    assert isinstance(done, Done) and done.stopped == "interrupted"
    assert not any(isinstance(e, (Units, AudioChunk)) for e in events)
    assert done.tokens < 40


def test_history_is_part_of_the_next_prompt(tiny_loaded, vocoder, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, None, max_new_tokens=8)
    audio = load_audio(question_wavs[0])
    first = list(pipe.respond(audio))[-1]
    assert first.user_speech is not None and first.user_speech.device.type == "cpu"
    history = [HistoryTurn(first.user_speech, None, first.text)]
    again_alone = list(pipe.respond("What did you just say?"))[-1]
    with_memory = list(pipe.respond("What did you just say?", history=history))[-1]
    assert with_memory.text != again_alone.text
    # A budget too small for the earlier turn drops it: the reply equals the memoryless one.
    tight = SpeechToSpeech(tiny_loaded, None, StreamingConfig(sampling=pipe.streaming.sampling, context_budget=40))
    assert list(tight.respond("What did you just say?", history=history))[-1].text == again_alone.text


def test_history_keeps_the_newest_turns_that_fit_its_budget() -> None:
    def typed(i: int) -> HistoryTurn:  # (3 + 3) // 3 + 16 = 18 positions each
        return HistoryTurn(None, f"q{i}?", f"a{i}.")

    unbounded = History([typed(i) for i in range(5)])
    assert len(unbounded) == 5
    assert [h.reply for h in unbounded.newest_within(40)] == ["a3.", "a4."]
    assert unbounded.newest_within(17) == [] and len(unbounded.newest_within(90)) == 5
    bounded = History(budget=54)
    for i in range(5):
        bounded.append(typed(i))
    assert [h.reply for h in bounded] == ["a2.", "a3.", "a4."]


def test_speech_over_30_s_is_encoded_window_by_window(tiny_loaded, question_wavs) -> None:
    pipe = _pipeline(tiny_loaded, None)
    speech = load_audio(question_wavs[0])
    long = np.tile(speech, int(31 * 16000 // len(speech)) + 1)
    assert len(long) > 30 * 16000
    embeddings = pipe.encode_speech(long)
    assert embeddings.shape[0] == 2 * 300
    # The second window is the rest of the audio, padded: not a copy of the first.
    torch.testing.assert_close(embeddings[:300], pipe.encode_speech(long[: 30 * 16000]))
    assert not torch.allclose(embeddings[300:], embeddings[:300])


def test_streamed_text_adds_up_to_the_reply_with_the_reference_clean_up(
    tokenizer_with_clean_up, tiny_loaded, question_wavs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With Llama-3.1's clean_up_tokenization_spaces the detokenizer holds back a reply's last
    # characters while the next token could still change them ("you '" may become "you'm"); the
    # pipeline must hand them out before Done, so the screen and the transcript say the same.
    from dataclasses import replace

    import omni_cli.pipeline as pipeline_module
    from omni_cli.model.llm import GeneratedToken

    tok = tokenizer_with_clean_up(True)
    model = replace(tiny_loaded, tokenizer=tok)
    scripted = tok("How are you ? '", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    hidden = torch.zeros(model.config.hidden_size)

    def scripted_generate(llm, embeds, stop_ids, sampling, should_stop=None, steps=None):
        for token in scripted:
            yield GeneratedToken(token, hidden, token in stop_ids)

    monkeypatch.setattr(pipeline_module, "generate", scripted_generate)
    events = list(_pipeline(model, None, max_new_tokens=40).respond("Hi"))
    done = events[-1]
    assert isinstance(done, Done) and done.text == "How are you? '"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text


def test_reply_options_change_the_prompt_and_speaking_not_the_text(tiny_loaded, vocoder, question_wavs) -> None:
    from omni_cli.config import ReplyOptions

    pipe = _pipeline(tiny_loaded, vocoder)
    audio = load_audio(question_wavs[0])
    spoken = list(pipe.respond(audio))
    silent = list(pipe.respond(audio, options=ReplyOptions(speak=False)))
    # Text-only replies run neither the speech decoder nor the vocoder, and say the same words.
    assert not any(isinstance(e, (Units, AudioChunk)) for e in silent)
    assert any(isinstance(e, AudioChunk) for e in spoken)
    assert silent[-1].text == spoken[-1].text and silent[-1].prompt_positions == spoken[-1].prompt_positions
    # A system prompt and an instruction are part of the prompt; the sampling given replaces the pipeline's.
    other = list(pipe.respond(audio, options=ReplyOptions(system="Be brief.", speech_instruction="Transcribe it.",
                                                          sampling=SamplingConfig(max_new_tokens=5, ignore_stop=True), speak=False)))
    assert other[-1].tokens == 5
    assert other[-1].prompt_positions != spoken[-1].prompt_positions
    # The speech decoder's static cache bounds a spoken reply: asking for more is refused, not overflowed.
    static = _pipeline(tiny_loaded, vocoder, decode_steps="static")
    with pytest.raises(ValueError, match="at most 24 tokens"):
        next(static.respond(audio, options=ReplyOptions(sampling=SamplingConfig(max_new_tokens=25))))


def test_a_question_that_cannot_fit_the_budget_is_refused_before_the_model_runs(tiny_loaded, question_wavs, monkeypatch) -> None:
    from omni_cli.config import ReplyOptions
    from omni_cli.pipeline import QuestionTooLong

    pipe = _pipeline(tiny_loaded, None, max_new_tokens=8)
    speech = load_audio(question_wavs[0])
    # A spoken question costs its frames (300 per 30 s window) before it is encoded.
    long = np.tile(speech, int(31 * 16000 // len(speech)) + 1)
    assert pipe.question_positions(long) == pipe.encode_speech(long).shape[0] + 32 == 632
    monkeypatch.setattr(pipe, "encode_speech", lambda *a, **k: pytest.fail("the speech encoder ran"))
    fourteen_windows = np.zeros(14 * 30 * 16000, np.float32)  # 4232 positions: over 4096 - 8
    with pytest.raises(QuestionTooLong, match="about 4232 prompt positions long, but 4088 fit"):
        list(pipe.respond(fourteen_windows))
    with pytest.raises(QuestionTooLong, match="about 16016 prompt positions"):
        list(pipe.respond("hello " * 8000))
    with pytest.raises(QuestionTooLong):  # a system prompt of the question's own counts too
        list(pipe.respond("hi", options=ReplyOptions(system="x" * 13000)))
