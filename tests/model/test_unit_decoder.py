"""The CTC speech decoder: reference layout, hand computations, streaming == offline, loss."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from omni_cli.config import OmniConfig, SpeechDecoderConfig
from omni_cli.model.unit_decoder import CtcCollapser, UnitDecoder, UnitSteps, collapse_ctc

LLM_HIDDEN = 32
UNITS = 50
# The released config's rope scaling, with a small original context so that the llama3
# rule actually rescales some of the few frequencies a tiny head has.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llm_config(llama3: bool = False, heads: int = 4) -> transformers.LlamaConfig:
    """A tiny Llama config standing in for the 8B LLM's (its rope/eps feed the decoder)."""
    extra = {"rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 500000.0} if llama3 else {}
    return transformers.LlamaConfig(
        hidden_size=LLM_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        **extra,
    )


def make_decoder(
    factor: int = 5,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    units: int = UNITS,
    llama3: bool = False,
    attn: str = "sdpa",
    seed: int = 0,
) -> UnitDecoder:
    """Random fp32 decoder whose frame labels change often (not all blank)."""
    torch.manual_seed(seed)
    cfg = SpeechDecoderConfig(layers, hidden, heads, 2 * hidden, factor, units)
    decoder = UnitDecoder(cfg, llm_config(llama3), attn_implementation=attn).eval()
    with torch.no_grad():
        # Sharp logits: argmax moves with small changes of the state, so frame-level
        # differences between the two decoding paths would show up as different units.
        decoder.output_proj.weight.mul_(20.0)
        for layer in decoder.layers:  # sharper attention: labels also change inside a token
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
        for name, param in decoder.named_parameters():
            if name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
    return decoder


def reply(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, LLM_HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_collapse(labels: list[int], blank: int) -> list[int]:
    """The reference's ctc_postprocess, restated: dedupe consecutive, then drop blanks."""
    deduped = [v for i, v in enumerate(labels) if i == 0 or v != labels[i - 1]]
    return [v for v in deduped if v != blank]


def llama3_inv_freq(head_dim: int, theta: float, rope: dict) -> torch.Tensor:
    """Meta's llama3 `apply_scaling`, restated in float64."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    old = rope["original_max_position_embeddings"]
    low_wavelen = old / rope["low_freq_factor"]
    high_wavelen = old / rope["high_freq_factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append((1 - smooth) * freq / rope["factor"] + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


# --- layout -------------------------------------------------------------------------------


def test_state_dict_keys_are_the_reference_names() -> None:
    decoder = make_decoder(layers=2)
    expected = ["input_proj.weight", "input_proj.bias"]
    for i in range(2):
        expected += [f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        expected += [f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        expected += [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
    expected += ["output_proj.weight", "output_proj.bias"]
    state = decoder.state_dict()
    assert sorted(state) == sorted(expected)
    assert list(decoder.named_buffers()) == []
    assert state["input_proj.weight"].shape == (32, LLM_HIDDEN)
    assert state["output_proj.weight"].shape == (UNITS + 1, 32)
    assert state["layers.0.mlp.gate_proj.weight"].shape == (64, 32)


def test_sizes_eps_and_llama3_rope_come_from_the_right_config() -> None:
    # LLM head_dim is 32/4 = 8; the decoder's must be its own 32/2 = 16, not the LLM's.
    decoder = make_decoder(heads=2, llama3=True)
    assert decoder.config.head_dim == 16
    assert decoder.config.num_key_value_heads == 2
    assert decoder.layers[0].input_layernorm.variance_epsilon == 1e-5  # the LLM's eps
    expected = llama3_inv_freq(16, 500000.0, LLAMA3_ROPE)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert not torch.allclose(expected, plain)  # the scaling does something here
    torch.testing.assert_close(decoder._rotary[0].inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_from_omni_config_reads_the_decoder_sizes() -> None:
    raw = llm_config(llama3=True).to_dict()
    raw.update(
        model_type="omni_speech2s_llama",
        speech_encoder_ds_rate=5,
        speech_encoder_hidden_size=16,
        speech_generator_type="ctc",
        ctc_decoder_config="(1,16,2,24)",
        ctc_upsample_factor=3,
        unit_vocab_size=7,
    )
    decoder = UnitDecoder.from_omni_config(OmniConfig.from_dict(raw))
    assert len(decoder.layers) == 1
    assert decoder.input_proj.weight.shape == (16, LLM_HIDDEN)
    assert decoder.output_proj.weight.shape == (8, 16)
    assert decoder.layers[0].mlp.up_proj.weight.shape == (24, 16)
    assert decoder.blank_id == 7
    assert decoder.predict_labels(reply(4)).shape == (12,)


# --- offline decoding against independent computations ------------------------------------


def hand_logits(decoder: UnitDecoder, hidden: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """One Llama decoder layer written out: upsample, RMSNorm, rope, causal attention, SwiGLU."""
    sd = {k: v.double() for k, v in decoder.state_dict().items()}
    eps = decoder.config.rms_norm_eps
    heads = decoder.cfg.num_heads
    frames = hidden.double().repeat_interleave(decoder.cfg.upsample_factor, dim=0)
    steps = frames.shape[0]

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x: torch.Tensor) -> torch.Tensor:  # x (heads, T, hd)
        angle = torch.arange(steps, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    state = frames @ sd["input_proj.weight"].T + sd["input_proj.bias"]
    a = rms(state, sd["layers.0.input_layernorm.weight"])
    q, k, v = (
        (a @ sd[f"layers.0.self_attn.{p}_proj.weight"].T).view(steps, heads, -1).transpose(0, 1) for p in "qkv"
    )
    q, k = rope(q), rope(k)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    state = state + attn.transpose(0, 1).reshape(steps, -1) @ sd["layers.0.self_attn.o_proj.weight"].T
    b = rms(state, sd["layers.0.post_attention_layernorm.weight"])
    gate = F.silu(b @ sd["layers.0.mlp.gate_proj.weight"].T)
    up = b @ sd["layers.0.mlp.up_proj.weight"].T
    state = state + (gate * up) @ sd["layers.0.mlp.down_proj.weight"].T
    return state @ sd["output_proj.weight"].T + sd["output_proj.bias"]


def test_one_layer_matches_hand_computation_with_llama3_rope() -> None:
    decoder = make_decoder(layers=1, heads=2, factor=4, llama3=True)
    hidden = reply(12)
    expected = hand_logits(decoder, hidden, llama3_inv_freq(16, 500000.0, LLAMA3_ROPE))
    with torch.no_grad():
        got = decoder(hidden[None])[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder.predict_labels(hidden), expected.argmax(-1))


def test_sdpa_and_eager_agree() -> None:
    sdpa = make_decoder(llama3=True)
    eager = make_decoder(llama3=True, attn="eager", seed=99)
    eager.load_state_dict(sdpa.state_dict())
    hidden = reply(30)
    with torch.no_grad():
        torch.testing.assert_close(eager(hidden[None]), sdpa(hidden[None]), rtol=1e-5, atol=1e-5)
    assert torch.equal(eager.predict_labels(hidden), sdpa.predict_labels(hidden))
    # The eager path also builds its own (additive) mask against the KV cache.
    stream = eager.start_stream()
    streamed = [u for chunk in hidden.split(3) for u in stream.step(chunk)]
    assert streamed == sdpa.predict_units(hidden)


def test_padded_batch_equals_each_reply_alone() -> None:
    decoder = make_decoder()
    lengths = [23, 40, 1, 9]
    replies = [reply(n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.nn.utils.rnn.pad_sequence(replies, batch_first=True, padding_value=7.0)
    with torch.no_grad():
        logits = decoder(batch, torch.tensor(lengths))
        assert logits.shape == (4, 40 * 5, UNITS + 1)
        for i, one in enumerate(replies):
            alone = decoder(one[None])[0]
            torch.testing.assert_close(logits[i, : len(alone)], alone, rtol=1e-5, atol=1e-5)
            assert torch.equal(logits[i, : len(alone)].argmax(-1), alone.argmax(-1))


def test_upsample_uniform_assignment() -> None:
    decoder = make_decoder(factor=2)
    hidden = torch.arange(1.0, 4.0)[None, :, None].repeat(2, 1, 3)  # state i holds value i+1
    frames, mask, positions = decoder.upsample(hidden, torch.tensor([3, 2]), torch.tensor([4, 7]))
    # Sample 0: max(3·2, 4) = 6 frames, each state twice. Sample 1: max(2·2, 7) = 7 frames,
    # frame j → state floor(j·2/7): 0,0,0,0,1,1,1.
    assert frames[0, :, 0].tolist() == [1, 1, 2, 2, 3, 3, 0]
    assert frames[1, :, 0].tolist() == [1, 1, 1, 1, 2, 2, 2]
    assert mask.tolist() == [[True] * 6 + [False], [True] * 7]
    assert positions.tolist() == [list(range(7))] * 2


# --- streaming == offline ------------------------------------------------------------------


def decode_in_chunks(decoder: UnitDecoder, hidden: torch.Tensor, size: int) -> tuple[list[int], torch.Tensor]:
    stream = decoder.start_stream()
    units: list[int] = []
    labels = []
    for chunk in hidden.split(size):
        units += stream.step(chunk[0] if size == 1 else chunk)  # (H,) and (k, H) forms
        labels.append(stream.last_labels)
    return units, torch.cat(labels)


@pytest.mark.parametrize("llama3", [False, True])
def test_streaming_gives_exactly_the_offline_units(llama3: bool) -> None:
    decoder = make_decoder(llama3=llama3)
    hidden = reply(40)
    offline_labels = decoder.predict_labels(hidden)
    offline = decoder.predict_units(hidden)
    # Not trivial: many different units, not all blank, labels changing inside tokens too.
    per_token = offline_labels.view(40, 5)
    assert len(offline) > 50 and len(set(offline)) > 20
    assert (offline_labels == decoder.blank_id).any() and (offline_labels != decoder.blank_id).any()
    assert (per_token != per_token[:, :1]).any(dim=1).sum() >= 5
    for size in (1, 2, 3, 7):
        units, labels = decode_in_chunks(decoder, hidden, size)
        assert torch.equal(labels, offline_labels), f"chunk size {size}"
        assert units == offline, f"chunk size {size}"


def test_streaming_with_the_released_upsample_factor() -> None:
    decoder = make_decoder(factor=25, llama3=True)
    hidden = reply(40, seed=5)
    offline = decoder.predict_units(hidden)
    assert len(offline) > 20
    units, labels = decode_in_chunks(decoder, hidden, 1)
    assert torch.equal(labels, decoder.predict_labels(hidden))
    assert units == offline
    # Uneven chunks: the carry and the positions hold for any split.
    stream = decoder.start_stream()
    bounds = [0, 1, 4, 5, 11, 19, 20, 33, 40]
    assert [u for a, b in itertools.pairwise(bounds) for u in stream.step(hidden[a:b])] == offline


@pytest.mark.parametrize("compiled", [False, True], ids=["static", "static+compiled"])
def test_static_cache_streams_give_exactly_the_offline_units(compiled: bool) -> None:
    decoder = make_decoder(factor=25, llama3=True)
    graphs: list = []

    def counting_backend(gm, example_inputs):  # dynamo's graph through AOT autograd, no C++ build
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    steps = UnitSteps(decoder, static_cache=True, compile=compiled, capacity_tokens=40, compile_backend=counting_backend)
    for seed in (5, 6):  # the second reply resets and reuses the same buffers
        hidden = reply(40, seed=seed)
        stream = decoder.start_stream(steps)
        units = [u for i in range(40) for u in stream.step(hidden[i])]
        assert units == decoder.predict_units(hidden)
    # One traced step serves every token of both replies: the shapes never change.
    assert len(graphs) == (1 if compiled else 0)
    # The cache holds 40 tokens' frames; a 41st is refused, not written past the end.
    with pytest.raises(RuntimeError, match="outgrew the speech decoder's static cache"):
        stream.step(hidden[0])


def test_a_newer_stream_takes_the_static_cache_and_the_older_one_stops() -> None:
    decoder = make_decoder()
    steps = UnitSteps(decoder, static_cache=True, capacity_tokens=20)
    old = decoder.start_stream(steps)
    old.step(reply(20, seed=3)[0])
    hidden = reply(20, seed=4)
    new = decoder.start_stream(steps)
    assert [u for i in range(20) for u in new.step(hidden[i])] == decoder.predict_units(hidden)
    with pytest.raises(RuntimeError, match="taken by a newer reply"):
        old.step(hidden[0])


def test_two_streams_do_not_share_state() -> None:
    decoder = make_decoder()
    first, second = reply(20, seed=3), reply(20, seed=4)
    a, b = decoder.start_stream(), decoder.start_stream()
    out_a: list[int] = []
    out_b: list[int] = []
    for i in range(20):
        out_a += a.step(first[i])
        out_b += b.step(second[i])
    assert out_a == decoder.predict_units(first)
    assert out_b == decoder.predict_units(second)
    assert out_a != out_b


def test_bfloat16_decoder_keeps_float32_rope_and_accepts_float32_states() -> None:
    decoder = make_decoder().to(torch.bfloat16)
    assert decoder._rotary[0].inv_freq.dtype == torch.float32
    hidden = reply(6)
    stream = decoder.start_stream()
    units = [u for h in hidden for u in stream.step(h)]
    assert all(0 <= u < UNITS for u in units) and units


def test_meta_device_init_then_loaded_weights_decode_the_same() -> None:
    # How a loader avoids initialising 400M random weights: build on meta, then load.
    source = make_decoder(llama3=True)
    with torch.device("meta"):
        decoder = UnitDecoder(source.cfg, llm_config(llama3=True))
    decoder = decoder.to_empty(device="cpu").eval()
    decoder.load_state_dict(source.state_dict())
    hidden = reply(10)
    assert torch.equal(decoder.predict_labels(hidden), source.predict_labels(hidden))
    stream = decoder.start_stream()
    assert stream.step(hidden[:0]) == []
    assert [u for h in hidden for u in stream.step(h)] == source.predict_units(hidden)


# --- CTC collapse ---------------------------------------------------------------------------


def test_collapse_ctc_examples() -> None:
    assert collapse_ctc([5, 5, 9, 9, 5, 1, 1, 9, 9], blank=9) == [5, 5, 1]
    assert collapse_ctc([9, 9, 9], blank=9) == []
    assert collapse_ctc(torch.tensor([3, 3, 3, 4, 3]), blank=9) == [3, 4, 3]
    assert collapse_ctc([], blank=9) == []
    collapser = CtcCollapser(blank=9)
    assert collapser.push([2, 2]) == [2]
    assert collapser.push([2, 9]) == []  # 2 continues across the boundary
    assert collapser.push([2]) == [2]  # after a blank, the same unit is a new one


def test_collapse_across_pushes_equals_collapse_of_the_whole() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        blank = rng.randint(1, 6)
        labels = [rng.randint(0, blank) for _ in range(rng.randint(0, 60))]
        cuts = sorted(rng.randint(0, len(labels)) for _ in range(rng.randint(0, 8)))
        pieces = [labels[a:b] for a, b in itertools.pairwise([0, *cuts, len(labels)])]
        collapser = CtcCollapser(blank)
        pushed = [u for p in pieces for u in collapser.push(torch.tensor(p) if rng.random() < 0.5 else p)]
        assert pushed == reference_collapse(labels, blank) == collapse_ctc(labels, blank)


# --- training loss --------------------------------------------------------------------------


def test_ctc_loss_matches_brute_force_sum_over_alignments() -> None:
    decoder = make_decoder(factor=2, units=2)  # labels 0, 1 and blank 2; 4 frames
    decoder.output_proj.weight.data.div_(20.0)  # soft probabilities: every path counts
    hidden = reply(2)
    target = [1, 0]
    with torch.no_grad():
        probs = decoder(hidden[None])[0].double().softmax(-1)
        total = sum(
            math.prod(probs[t, label].item() for t, label in enumerate(path))
            for path in itertools.product(range(3), repeat=4)
            if reference_collapse(list(path), 2) == target
        )
        loss = decoder.ctc_loss(hidden[None], None, torch.tensor([target]))
    assert loss.item() == pytest.approx(-math.log(total) / len(target), rel=1e-5)


def test_ctc_loss_of_a_padded_batch_matches_torch_ctc_by_hand() -> None:
    decoder = make_decoder(factor=2)
    lengths = torch.tensor([5, 3, 2])
    hidden = torch.randn(3, 5, LLM_HIDDEN, generator=torch.Generator().manual_seed(8))
    # The third target (7 units) is longer than its 2·2 frames: frames stretch to 7.
    units = [[4, 8, 8, 15], [1], [3, 9, 27, 3, 5, 6, 2]]
    targets = torch.full((3, 7), -100)
    for i, u in enumerate(units):
        targets[i, : len(u)] = torch.tensor(u)
    target_lengths = torch.tensor([len(u) for u in units])
    loss = decoder.ctc_loss(hidden, lengths, targets)
    logits = decoder(hidden, lengths, target_lengths)
    assert logits.shape[1] == 10
    frame_lengths = torch.tensor([10, 6, 7])
    by_hand = F.ctc_loss(
        F.log_softmax(logits.float(), -1).transpose(0, 1),
        torch.tensor([u for seq in units for u in seq]),
        frame_lengths,
        target_lengths,
        blank=UNITS,
        reduction="sum",
        zero_infinity=True,
    ) / 12
    torch.testing.assert_close(loss, by_hand)
    assert loss.item() > 0 and math.isfinite(loss.item())
    # Lengths given explicitly read the same, whatever the padding value is.
    filled = targets.masked_fill(targets == -100, 0)
    torch.testing.assert_close(decoder.ctc_loss(hidden, lengths, filled, target_lengths), loss)
    loss.backward()
    assert decoder.input_proj.weight.grad is not None


def test_tiny_decoder_overfits_one_reply() -> None:
    torch.manual_seed(0)
    cfg = SpeechDecoderConfig(2, 32, 4, 64, 4, 20)
    decoder = UnitDecoder(cfg, llm_config())
    hidden = reply(6, seed=21)
    target = [3, 17, 5, 5 + 1, 0, 11, 19, 2, 3, 8]
    targets = torch.tensor([target])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = decoder.ctc_loss(hidden[None], None, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 10
    decoder.eval()
    assert decoder.predict_units(hidden) == target
    stream = decoder.start_stream()
    assert [u for h in hidden for u in stream.step(h)] == target
