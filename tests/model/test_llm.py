"""Prompt building, speech splicing, and token-by-token generation against transformers' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.llm import (
    SPEECH_TOKEN_INDEX,
    IncrementalDetokenizer,
    LlmSteps,
    SamplingConfig,
    Turn,
    build_prompt_ids,
    generate,
    speech_turn,
    splice_speech,
    stop_token_ids,
)

# The reference renders "<|begin_of_text|>..." and then tokenizes with the tokenizer's own BOS
# added (LLaVA's tokenizer_speech_token), so the released model sees two BOS ids.
REFERENCE_PROMPT = (
    "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and speech assistant. You are able to understand the speech content "
    "that the user provides, and assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<speech>\n"
    "Please directly answer the questions in the user's speech.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_prompt_is_the_reference_text_with_one_speech_slot(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    ids = build_prompt_ids(tok, [speech_turn()])
    assert ids.count(SPEECH_TOKEN_INDEX) == 1
    cut = ids.index(SPEECH_TOKEN_INDEX)
    text = tok.decode(ids[:cut]) + "<speech>" + tok.decode(ids[cut + 1 :])
    assert text == REFERENCE_PROMPT
    # The special tokens are single ids, not spelled out in bytes; the BOS is doubled as in the reference.
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[:3] == [bos, bos, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert bos not in ids[2:]


def test_typed_speech_marker_is_text_not_a_slot(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    ids = build_prompt_ids(tok, [Turn("user", "what does <speech> mean?"), Turn("assistant", "a <speech> tag")])
    assert SPEECH_TOKEN_INDEX not in ids
    assert "what does <speech> mean?" in tok.decode(ids)
    ids = build_prompt_ids(tok, [Turn("user", "odd \ue000speech\ue000 marker"), speech_turn()])
    assert ids.count(SPEECH_TOKEN_INDEX) == 1


def test_multi_turn_prompt_keeps_order_and_slots(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    turns = [speech_turn(), Turn("assistant", "Paris."), Turn("user", "And Spain?"), Turn("assistant", "Madrid."), speech_turn()]
    ids = build_prompt_ids(tok, turns)
    assert ids.count(SPEECH_TOKEN_INDEX) == 2
    text = tok.decode([i for i in ids if i != SPEECH_TOKEN_INDEX])
    assert text.index("Paris.") < text.index("And Spain?") < text.index("Madrid.")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_splice_puts_speech_exactly_at_the_slot(tiny_loaded) -> None:
    m = tiny_loaded
    emb = m.llm.get_input_embeddings()
    ids = build_prompt_ids(m.tokenizer, [speech_turn()])
    # 3000 mel frames → 1500 encoder frames → (3000+1)//2//5 = 300 speech embeddings.
    n = SpeechAdaptor.output_length(3000, m.config.speech_encoder_ds_rate)
    assert n == 300
    frames = torch.randn(1, 1500, m.config.speech_encoder_hidden_size)
    speech = m.adaptor(frames)[0]
    assert speech.shape[0] == n
    out = splice_speech(emb, ids, [speech])[0]
    cut = ids.index(SPEECH_TOKEN_INDEX)
    assert out.shape[0] == len(ids) - 1 + n
    assert torch.equal(out[cut : cut + n], speech)
    text_ids = torch.tensor([i for i in ids if i != SPEECH_TOKEN_INDEX])
    text_rows = torch.cat([out[:cut], out[cut + n :]])
    assert torch.equal(text_rows, emb(text_ids))


def _prompt_embeds(m, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = build_prompt_ids(m.tokenizer, [speech_turn()])
    speech = torch.randn(12, m.config.hidden_size) * 0.5
    return splice_speech(m.llm.get_input_embeddings(), ids, [speech])


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_generation_matches_transformers_generate(tiny_loaded, seed: int) -> None:
    m = tiny_loaded
    embeds = _prompt_embeds(m, seed)
    stops = stop_token_ids(m.tokenizer)
    ours = [t.token_id for t in generate(m.llm, embeds, stops, SamplingConfig(max_new_tokens=20))]
    with torch.no_grad():
        ref = m.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=sorted(stops)[0],
        )
    ref_ids = ref[0].tolist()
    # transformers pads finished sequences; compare up to and including the first stop.
    assert ours == ref_ids[: len(ours)]
    assert len(set(ours)) > 1, "random tiny model should not repeat a single token"


def test_yielded_hidden_states_equal_a_full_forward(tiny_loaded) -> None:
    m = tiny_loaded
    embeds = _prompt_embeds(m, 2)
    out = list(generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=10)))
    reply = torch.tensor([[t.token_id for t in out]])
    full = torch.cat([embeds, m.llm.get_input_embeddings()(reply[:, :-1])], dim=1)
    with torch.no_grad():
        hs = m.llm(inputs_embeds=full, output_hidden_states=True).hidden_states[-1][0]
    p = embeds.shape[1]
    for i, tok in enumerate(out):
        # The hidden state that produced token i sits at position p - 1 + i.
        torch.testing.assert_close(tok.hidden, hs[p - 1 + i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["static", "static+compiled"])
def test_static_cache_steps_give_the_same_reply_as_the_growing_cache(tiny_loaded, compiled: bool) -> None:
    m = tiny_loaded
    graphs: list = []

    def counting_backend(gm, example_inputs):  # dynamo's graph through AOT autograd, no C++ build
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    steps = LlmSteps(m.llm, static_cache=True, compile=compiled, capacity=256, compile_backend=counting_backend)
    dynamic = list(generate(m.llm, _prompt_embeds(m, 5), set(), SamplingConfig(max_new_tokens=12)))
    for seed in (5, 6):  # the second reply reuses (resets) the same static buffers
        embeds = _prompt_embeds(m, seed)
        ours = list(generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=12), steps=steps))
        ref = dynamic if seed == 5 else list(generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=12)))
        assert [t.token_id for t in ours] == [t.token_id for t in ref]
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-4)
    # Compiled: one graph for every step of both replies (fixed shapes: no recompiles per reply).
    assert len(graphs) == (1 if compiled else 0)


def test_static_steps_fall_back_to_a_growing_cache_when_the_prompt_does_not_fit(tiny_loaded) -> None:
    m = tiny_loaded
    embeds = _prompt_embeds(m, 7)
    steps = LlmSteps(m.llm, static_cache=True, capacity=int(embeds.shape[1]) + 3)
    ours = [t.token_id for t in generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=8), steps=steps)]
    ref = [t.token_id for t in generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=8))]
    assert ours == ref and len(ours) == 8


def test_a_newer_reply_takes_the_static_cache_and_the_older_one_stops(tiny_loaded) -> None:
    m = tiny_loaded
    steps = LlmSteps(m.llm, static_cache=True, capacity=256)
    old = generate(m.llm, _prompt_embeds(m, 8), set(), SamplingConfig(max_new_tokens=4), steps=steps)
    next(old)  # an interrupted reply, not closed yet
    new = [t.token_id for t in generate(m.llm, _prompt_embeds(m, 9), set(), SamplingConfig(max_new_tokens=4), steps=steps)]
    assert new == [t.token_id for t in generate(m.llm, _prompt_embeds(m, 9), set(), SamplingConfig(max_new_tokens=4))]
    # The older reply must not read the newer reply's keys and values.
    with pytest.raises(RuntimeError, match="taken by a newer reply"):
        next(old)


def test_generation_stops_at_eot_and_flags_it(tiny_loaded) -> None:
    m = tiny_loaded
    embeds = _prompt_embeds(m, 3)
    first = next(iter(generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=1)))).token_id
    out = list(generate(m.llm, embeds, {first}, SamplingConfig(max_new_tokens=10)))
    assert len(out) == 1 and out[0].is_stop
    forced = list(generate(m.llm, embeds, {first}, SamplingConfig(max_new_tokens=10, ignore_stop=True)))
    assert len(forced) == 10 and not any(t.is_stop for t in forced)


def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(tiny_loaded) -> None:
    m = tiny_loaded
    embeds = _prompt_embeds(m, 4)
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    a = [t.token_id for t in generate(m.llm, embeds, set(), cfg)]
    b = [t.token_id for t in generate(m.llm, embeds, set(), cfg)]
    greedy = [t.token_id for t in generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=16))]
    assert a == b
    assert a != greedy


def test_incremental_detokenizer_concatenates_to_the_full_decode(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    text = "Héllo wörld — naïve café ✓, it's 42!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(("clean_up", "expected"), [(True, "Hello. How are you? I'm fine, it's 42!"), (False, None)])
def test_detokenizer_cleans_spaces_as_the_checkpoint_asks(tokenizer_with_clean_up, clean_up: bool, expected: str | None) -> None:
    # The reference (transformers 4.43) applies clean_up_tokenization_spaces from tokenizer_config.json;
    # transformers 5 ignores it for BPE tokenizers, so the detokenizer applies it itself.
    tok = tokenizer_with_clean_up(clean_up)
    spaced = "Hello . How are you ? I 'm fine , it 's 42 !"
    ids = tok(spaced, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids) + detok.finish()
    assert streamed == detok.text == (expected or spaced)


def test_cleaned_deltas_add_up_to_the_cleaned_text_for_any_token_sequence(tokenizer_with_clean_up) -> None:
    import random

    from omni_cli.model.llm import clean_up_tokenization

    tok = tokenizer_with_clean_up(True)
    pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in (" .", " '", "s", " n't", " 're", " ?", " ", "m", "ve", "é", "a")]
    rng = random.Random(0)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 12)) for i in rng.choice(pieces)]
        detok = IncrementalDetokenizer(tok)
        shown = ""
        for i in ids:
            shown += detok.push(i)
            # What is on screen is always the start of what the reference prints at the end.
            assert clean_up_tokenization(tok.decode(ids, clean_up_tokenization_spaces=False)).startswith(shown)
        shown += detok.finish()
        assert shown == clean_up_tokenization(tok.decode(ids, clean_up_tokenization_spaces=False))


def test_adaptor_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    adaptor = SpeechAdaptor(encoder_hidden=3, llm_hidden=4, downsample=5, inner=6)
    frames = torch.randn(2, 13, 3)  # 13 frames: the last 3 are dropped
    out = adaptor(frames)
    assert out.shape == (2, 2, 4)
    x = frames.numpy()[:, :10].reshape(2, 2, 15)  # 5 consecutive frames side by side
    w1, b1 = adaptor.linear1.weight.detach().numpy(), adaptor.linear1.bias.detach().numpy()
    w2, b2 = adaptor.linear2.weight.detach().numpy(), adaptor.linear2.bias.detach().numpy()
    expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-6)
