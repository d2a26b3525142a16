"""Unit vocoder: fairseq-compatible forward, safe loading/conversion, streaming seams, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni_cli.config import VocoderConfig
from omni_cli.errors import CheckpointError, ConfigError, OmniError
from omni_cli.model.vocoder import UnitRangeError, UnitVocoder, VocoderInputError, VocoderStream
from omni_cli.model.vocoder_loading import convert_vocoder_checkpoint, fold_weight_norm, load_vocoder
from omni_cli.weights.layout import locate_vocoder_files
from omni_cli.tiny.vocoder import TINY_CHECKPOINT_NAME, make_tiny_vocoder
from vocoder_seams import receptive_radius_frames, seam_error


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vocoder(tmp_path_factory.mktemp("vocoder"), seed=0)


@pytest.fixture(scope="module")
def vocoder(tiny_dir: Path) -> UnitVocoder:
    return load_vocoder(tiny_dir)


def random_units(n: int, num_embeddings: int, seed: int) -> torch.Tensor:
    return torch.randint(0, num_embeddings, (n,), generator=torch.Generator().manual_seed(seed))


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# An independent, functional transcription of fairseq's CodeGenerator forward (hifigan.py,
# codehifigan.py, fastspeech2.VariancePredictor), run on the raw weight-norm checkpoint.


def _wn(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    g, v = state[name + ".weight_g"], state[name + ".weight_v"]
    return g * v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def fairseq_reference_audio(
    state: dict[str, torch.Tensor], raw_cfg: dict, units: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    def conv(x: torch.Tensor, name: str, **kw: int) -> torch.Tensor:  # weight-norm conv of the generator
        return F.conv1d(x, _wn(state, name), state[f"{name}.bias"], **kw)

    def dp_block(x: torch.Tensor, i: int) -> torch.Tensor:  # Conv1d(k=3, pad 1) + ReLU, then LayerNorm; B x T x C
        p = f"dur_predictor.conv{i}.0"
        h = F.relu(F.conv1d(x.transpose(1, 2), state[f"{p}.weight"], state[f"{p}.bias"], padding=1)).transpose(1, 2)
        return F.layer_norm(h, (h.shape[2],), state[f"dur_predictor.ln{i}.weight"], state[f"dur_predictor.ln{i}.bias"])

    x = F.embedding(units[None], state["dict.weight"])  # B x T x C
    h = dp_block(dp_block(x, 1), 2)
    log_dur = F.linear(h, state["dur_predictor.proj.weight"], state["dur_predictor.proj.bias"]).squeeze(2)
    dur = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
    x = torch.repeat_interleave(x.transpose(1, 2), dur.view(-1), dim=2)
    x = conv(x, "conv_pre", padding=3)
    kernels = list(zip(raw_cfg["resblock_kernel_sizes"], raw_cfg["resblock_dilation_sizes"]))
    for i, (u, k) in enumerate(zip(raw_cfg["upsample_rates"], raw_cfg["upsample_kernel_sizes"])):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, _wn(state, f"ups.{i}"), state[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        xs = None
        for j, (kr, dils) in enumerate(kernels):
            r, name = x, f"resblocks.{i * len(kernels) + j}"
            for m, d in enumerate(dils):
                xt = conv(F.leaky_relu(r, 0.1), f"{name}.convs1.{m}", dilation=d, padding=(kr * d - d) // 2)
                r = conv(F.leaky_relu(xt, 0.1), f"{name}.convs2.{m}", padding=(kr - 1) // 2) + r
            xs = r if xs is None else xs + r
        x = xs / len(kernels)
    x = torch.tanh(conv(F.leaky_relu(x), "conv_post", padding=3))
    return x.squeeze(), dur.view(-1)


def test_forward_matches_fairseq_transcription(tiny_dir: Path, vocoder: UnitVocoder) -> None:
    state = torch.load(tiny_dir / TINY_CHECKPOINT_NAME, map_location="cpu", weights_only=True)["generator"]
    raw = json.loads((tiny_dir / "config.json").read_text())
    units = random_units(20, vocoder.config.num_embeddings, seed=3)
    with torch.no_grad():
        ref, ref_dur = fairseq_reference_audio(state, raw, units)
    assert torch.equal(vocoder.units_to_durations(units), ref_dur)
    torch.testing.assert_close(vocoder.synthesize(units), ref, atol=2e-5, rtol=0)


def test_output_length_is_sum_of_durations_times_hop(vocoder: UnitVocoder) -> None:
    hop = vocoder.config.hop_length
    assert hop == 320  # the tiny config keeps the release's 20 ms frames at 16 kHz
    units = random_units(30, vocoder.config.num_embeddings, seed=1)
    dur = vocoder.units_to_durations(units)
    assert dur.dtype == torch.long and dur.shape == (30,) and int(dur.min()) >= 1
    assert 2.0 <= dur.float().mean() <= 5.0 and len(set(dur.tolist())) > 2  # meaningful, varied durations
    wav = vocoder.synthesize(units.tolist())
    assert wav.dtype == torch.float32 and wav.shape == (int(dur.sum()) * hop,)
    assert float(wav.abs().max()) <= 1.0 and float(wav.pow(2).mean().sqrt()) > 0.01
    # Explicit durations win over predicted ones; the (1, T) layout of the reference is accepted.
    given = torch.arange(30) % 3 + 1
    assert vocoder.synthesize(units[None], given).shape == (int(given.sum()) * hop,)


def test_load_in_reduced_precision(tiny_dir: Path, vocoder: UnitVocoder) -> None:
    half = load_vocoder(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    units = random_units(8, vocoder.config.num_embeddings, seed=7)
    durations = vocoder.units_to_durations(units)
    full, low = vocoder.synthesize(units, durations), half.synthesize(units, durations)
    assert low.dtype == torch.float32 and low.shape == full.shape
    assert float(torch.corrcoef(torch.stack([full, low]))[0, 1]) > 0.99


def test_released_pickle_and_converted_safetensors_give_identical_audio(tiny_dir: Path, tmp_path: Path) -> None:
    out = convert_vocoder_checkpoint(tiny_dir / TINY_CHECKPOINT_NAME, tmp_path / "converted")
    assert out == tmp_path / "converted" / "vocoder.safetensors"
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", "vocoder.safetensors"]  # no temp files left
    assert (out.parent / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    from_pickle = load_vocoder(tiny_dir / TINY_CHECKPOINT_NAME)
    from_safetensors = load_vocoder(out.parent)
    units = random_units(25, from_pickle.config.num_embeddings, seed=2)
    assert torch.equal(from_pickle.synthesize(units), from_safetensors.synthesize(units))
    # A directory holding both prefers the converted copy.
    both = tmp_path / "both"
    both.mkdir()
    for p in (tiny_dir / "config.json", tiny_dir / TINY_CHECKPOINT_NAME, out):
        (both / p.name).write_bytes(p.read_bytes())
    assert locate_vocoder_files(both)[1].name == "vocoder.safetensors"


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_weight_norm_folding_matches_torch_parametrization(kind: str) -> None:
    torch.manual_seed(0)
    module = torch.nn.Conv1d(6, 4, 5) if kind == "conv" else torch.nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2)
    module = torch.nn.utils.parametrizations.weight_norm(module)  # dim=0, as fairseq's weight_norm
    with torch.no_grad():
        module.parametrizations.weight.original0.uniform_(0.5, 2.0)  # g independent of ||v||
    g = module.parametrizations.weight.original0.detach()
    v = module.parametrizations.weight.original1.detach()
    assert g.shape == (v.shape[0], 1, 1)
    folded = fold_weight_norm({"m.weight_g": g, "m.weight_v": v, "m.bias": module.bias.detach()})
    assert set(folded) == {"m.weight", "m.bias"}
    torch.testing.assert_close(folded["m.weight"], module.weight.detach(), atol=1e-6, rtol=1e-6)
    # The newer parametrization key layout folds the same way.
    again = fold_weight_norm({"m.parametrizations.weight.original0": g, "m.parametrizations.weight.original1": v})
    assert torch.equal(again["m.weight"], folded["m.weight"])


# ---------------------------------------------------------------------------------------------
# Streaming


def stream_in_chunks(
    vocoder: UnitVocoder, units: torch.Tensor, sizes: list[int], durations: torch.Tensor | None, **kwargs: int
) -> tuple[np.ndarray, list[int], VocoderStream]:
    """Push `units` in chunks (sizes[-1] repeats); returns audio, chunk-end sample positions, the stream."""
    stream = VocoderStream(vocoder, **kwargs)
    parts, ends, start, k = [], [], 0, 0
    while start < len(units):
        stop = min(len(units), start + sizes[min(k, len(sizes) - 1)])
        parts.append(stream.push(units[start:stop], None if durations is None else durations[start:stop]))
        ends.append(sum(stream.durations) * vocoder.hop_length)
        start, k = stop, k + 1
    parts.append(stream.flush())
    return np.concatenate(parts), ends[:-1], stream


# Schedules: single units, a smaller first chunk, the reference's minimum (10) and default (40) Ω.
SCHEDULES = [([1], 14), ([4, 10], 44), ([10], 44), ([40], 84)]


@pytest.mark.parametrize(("sizes", "n_units"), SCHEDULES, ids=["1", "4+10", "10", "40"])
def test_streaming_equals_whole_synthesis_away_from_seams(vocoder: UnitVocoder, sizes: list[int], n_units: int) -> None:
    hop = vocoder.hop_length
    units = random_units(n_units, vocoder.config.num_embeddings, seed=4)
    durations = vocoder.units_to_durations(units)
    whole = vocoder.synthesize(units, durations).numpy()
    streamed, seams, _ = stream_in_chunks(vocoder, units, sizes, durations)
    assert streamed.shape == whole.shape and streamed.dtype == np.float32

    # Exact (float noise) outside [seam - receptive radius, seam + 1 frame): the audio before a
    # seam was rendered without the (unknown) units after it; with 8 units of left context the
    # audio after a seam is the whole-utterance audio.
    before = int(np.ceil(receptive_radius_frames(vocoder.config))) * hop
    outside = np.ones(len(whole), dtype=bool)
    for s in seams:
        outside[max(0, s - before) : s + hop] = False
    if sizes[-1] >= 10:  # single-unit chunks are all seam; longer ones must be mostly exact
        assert outside.mean() > 0.2
        assert np.abs(streamed - whole)[outside].max() < 1e-4

    # At the seams: default streaming (8 units of context + the last 160 ms re-rendered) vs the
    # reference's independent chunks vs left context alone. Relative RMS error over everything
    # a seam can touch (± the receptive radius, ~21 frames).
    reference, _, _ = stream_in_chunks(vocoder, units, sizes, durations, context_units=0, holdback_samples=0)
    context_only, _, _ = stream_in_chunks(vocoder, units, sizes, durations, context_units=8, holdback_samples=0)
    err_default = seam_error(streamed, whole, seams, before)
    err_reference = seam_error(reference, whole, seams, before)
    err_context = seam_error(context_only, whole, seams, before)
    print(f"seam error, chunks {sizes}: reference {err_reference:.4f}, context {err_context:.4f}, default {err_default:.4f}")
    assert err_reference > err_context > err_default
    if sizes[-1] >= 10:  # Ω >= 10 as in the reference: seams all but vanish
        assert err_default < 0.02 and err_default < err_reference / 20
    else:  # single units: every chunk is mostly seam; still clearly better than independent chunks
        assert err_default < 0.6 * err_reference


def test_streamed_predicted_durations_match_whole_except_at_chunk_ends(vocoder: UnitVocoder) -> None:
    units = random_units(44, vocoder.config.num_embeddings, seed=5)
    whole = vocoder.units_to_durations(units).tolist()
    audio, _, stream = stream_in_chunks(vocoder, units, [4, 10], None)
    assert len(stream.durations) == len(units)
    assert audio.shape == (sum(stream.durations) * vocoder.hop_length,)
    # Two k=3 convs see 2 units either side: only a chunk's last 2 units lack their right neighbours.
    chunk_ends = [4, 14, 24, 34]
    at_edge = {i for end in chunk_ends for i in (end - 2, end - 1)}
    differs = {i for i, (a, b) in enumerate(zip(stream.durations, whole)) if a != b}
    assert differs <= at_edge
    # Without left context, chunk starts are unreliable too (the test above is not vacuous).
    _, _, blind = stream_in_chunks(vocoder, units, [4, 10], None, context_units=0, holdback_samples=0)
    blind_differs = {i for i, (a, b) in enumerate(zip(blind.durations, whole)) if a != b}
    assert blind_differs - at_edge


def test_stream_splices_held_tail_into_its_rerender(vocoder: UnitVocoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Splice mechanics with a render that returns the push number: old tail fades into the re-render."""
    hop = vocoder.hop_length
    pushes = iter(range(1, 10))
    monkeypatch.setattr(vocoder, "render", lambda u, d: torch.full((int(d.sum()) * hop,), float(next(pushes))))
    stream = VocoderStream(vocoder, context_units=8, holdback_samples=3 * hop)
    ones = [1] * 10
    a = stream.push(ones, ones)  # 10 frames rendered, the last 3 held back
    b = stream.push(ones, ones)
    c = stream.flush()
    assert a.shape == (7 * hop,) and np.all(a == 1.0)
    assert b.shape == (10 * hop,) and c.shape == (3 * hop,) and np.all(c == 2.0)
    f = stream.splice_samples
    ramp = b[:f]  # the held stretch enters the re-render through a raised-cosine cross-fade
    assert 0 < f < 3 * hop and np.all(np.diff(ramp) > 0) and 1.0 < ramp[0] < ramp[-1] < 2.0
    assert np.all(b[f:] == 2.0)


def test_stream_handles_empty_push_and_rejects_bad_units_without_losing_state(vocoder: UnitVocoder) -> None:
    stream = VocoderStream(vocoder)
    assert stream.push([]).size == 0
    first = stream.push([1, 2, 3, 4, 5])
    with pytest.raises(UnitRangeError):
        stream.push([6, vocoder.config.num_embeddings])
    assert stream.units == [1, 2, 3, 4, 5]
    rest = np.concatenate([stream.push([6, 7]), stream.flush()])
    assert first.size + rest.size == sum(stream.durations) * vocoder.hop_length


# ---------------------------------------------------------------------------------------------
# Errors


def test_out_of_range_and_empty_units_are_one_line_errors(vocoder: UnitVocoder) -> None:
    n = vocoder.config.num_embeddings
    with pytest.raises(UnitRangeError) as exc:
        vocoder.synthesize([3, n, 4])
    assert str(n) in one_line(exc) and isinstance(exc.value, OmniError)
    with pytest.raises(UnitRangeError) as exc:
        vocoder.units_to_durations(torch.tensor([-1]))
    assert "-1" in one_line(exc)
    with pytest.raises(VocoderInputError) as exc:
        vocoder.synthesize([])
    assert "empty" in one_line(exc)
    with pytest.raises(VocoderInputError) as exc:
        vocoder.synthesize([1, 2], durations=[1])
    one_line(exc)


def test_random_bytes_and_non_vocoder_pickles_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    junk = tmp_path / "g_00000001"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(junk)
    msg = one_line(exc)
    assert "g_00000001" in msg and "not a torch checkpoint" in msg
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(other)
    assert "generator" in one_line(exc)


class _Trap:
    """Unpickling this runs `_spring` — which the weights-only loader must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (_spring, (str(self.marker),))


def _spring(marker: str) -> None:
    Path(marker).write_text("unpickled")


def test_pickle_with_arbitrary_object_is_refused_and_not_executed(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    marker = tmp_path / "sprung"
    state = torch.load(tiny_dir / TINY_CHECKPOINT_NAME, weights_only=True)
    state["trap"] = _Trap(marker)
    path = tmp_path / "g_00500000"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(tmp_path)
    msg = one_line(exc)
    assert "refusing" in msg and "_spring" in msg
    with pytest.raises(CheckpointError):
        convert_vocoder_checkpoint(path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out" / "vocoder.safetensors").exists()
    # A plain pickle (not torch.save) of an object is refused the same way.
    path.write_bytes(pickle.dumps(_Trap(marker), protocol=2))
    with pytest.raises(CheckpointError):
        load_vocoder(tmp_path)
    assert not marker.exists()


def test_config_that_does_not_match_the_weights(tiny_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw["upsample_initial_channel"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / TINY_CHECKPOINT_NAME).write_bytes((tiny_dir / TINY_CHECKPOINT_NAME).read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(tmp_path)
    msg = one_line(exc)
    assert "conv_pre.weight" in msg and "does not match" in msg and "(32, 16, 7)" in msg and "(64, 16, 7)" in msg


def test_missing_and_unexpected_keys_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    state = torch.load(tiny_dir / TINY_CHECKPOINT_NAME, weights_only=True)
    path = tmp_path / TINY_CHECKPOINT_NAME
    missing = {"generator": {k: v for k, v in state["generator"].items() if k != "dur_predictor.proj.bias"}}
    torch.save(missing, path)
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(tmp_path)
    assert "dur_predictor.proj.bias" in one_line(exc)
    extra = {"generator": {**state["generator"], "spkr.weight": torch.zeros(3, 16)}}
    torch.save(extra, path)
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(tmp_path)
    assert "spkr.weight" in one_line(exc)
    half = {"generator": {k: v for k, v in state["generator"].items() if k != "conv_post.weight_g"}}
    torch.save(half, path)
    with pytest.raises(CheckpointError) as exc:
        load_vocoder(tmp_path)
    assert "conv_post.weight_v" in one_line(exc)


def test_unsupported_configs_are_config_errors(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    with pytest.raises(ConfigError):
        UnitVocoder(VocoderConfig.from_dict({**raw, "resblock": "2"}))
    with pytest.raises(ConfigError):
        UnitVocoder(VocoderConfig.from_dict({**raw, "multispkr": True}))
