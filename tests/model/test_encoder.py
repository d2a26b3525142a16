"""Whisper encoder loading from both released layouts, and strictness about their contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omni_cli.errors import CheckpointError
from omni_cli.model.encoder import SpeechEncoder, hf_key_to_openai, load_speech_encoder, openai_key_to_hf
from omni_cli.tiny.whisper import make_tiny_whisper, tiny_whisper_config

N_MELS = 128
D_MODEL = 32
FRAMES = 3000


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper", fmt="hf", seed=3)


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-large-v3.pt", fmt="openai", seed=3)


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(2, N_MELS, FRAMES, generator=generator)


def _encode(encoder: torch.nn.Module, mel: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(mel)


def test_both_formats_hold_the_same_weights_and_give_the_same_output(
    tiny_dir: Path, tiny_pt: Path, mel: torch.Tensor
) -> None:
    from_hf = load_speech_encoder(tiny_dir)
    from_openai = load_speech_encoder(tiny_pt)
    hf_state, openai_state = from_hf.state_dict(), from_openai.state_dict()
    assert hf_state.keys() == openai_state.keys()
    for key in hf_state:
        torch.testing.assert_close(hf_state[key], openai_state[key], rtol=0, atol=0)
    out = _encode(from_hf, mel)
    assert tuple(out.shape) == (2, FRAMES // 2, D_MODEL)
    torch.testing.assert_close(out, _encode(from_openai, mel), rtol=0, atol=1e-6)


def test_output_equals_transformers_whisper_model(tiny_dir: Path, mel: torch.Tensor) -> None:
    reference = WhisperModel.from_pretrained(tiny_dir).eval()
    expected = _encode(reference.encoder, mel).last_hidden_state
    torch.testing.assert_close(_encode(load_speech_encoder(tiny_dir), mel), expected, rtol=0, atol=1e-6)


def test_a_different_seed_gives_a_different_encoder(tiny_dir: Path, tmp_path: Path, mel: torch.Tensor) -> None:
    other = load_speech_encoder(make_tiny_whisper(tmp_path / "other", seed=4))
    assert not torch.allclose(_encode(other, mel), _encode(load_speech_encoder(tiny_dir), mel), atol=1e-3)


def test_properties_eval_mode_dtype_and_freezing(tiny_pt: Path) -> None:
    encoder = load_speech_encoder(tiny_pt, dtype=torch.bfloat16)
    assert (encoder.n_mels, encoder.hidden_size, encoder.expected_frames) == (N_MELS, D_MODEL, FRAMES)
    assert not encoder.training
    assert encoder.config._attn_implementation == "sdpa"
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    encoder.requires_grad_(False)
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("layout", ["sharded", "whisper_model", "bare_encoder"])
def test_other_transformers_layouts_load_the_same_encoder(
    layout: str, tiny_dir: Path, tmp_path: Path, mel: torch.Tensor
) -> None:
    config = tiny_whisper_config(N_MELS, D_MODEL, layers=2, heads=2)
    full = WhisperModel.from_pretrained(tiny_dir)
    if layout == "sharded":
        full.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert not (tmp_path / "model.safetensors").exists()
    elif layout == "whisper_model":
        full.save_pretrained(tmp_path)
    else:
        bare = WhisperEncoder(config)
        bare.load_state_dict(full.encoder.state_dict())
        bare.save_pretrained(tmp_path)
    torch.testing.assert_close(
        _encode(load_speech_encoder(tmp_path), mel), _encode(load_speech_encoder(tiny_dir), mel), rtol=0, atol=1e-6
    )


def test_shorter_input_runs_the_same_modules(tiny_dir: Path, mel: torch.Tensor) -> None:
    encoder = load_speech_encoder(tiny_dir)
    # The length-agnostic path is the transformers forward at full length ...
    torch.testing.assert_close(_encode(encoder._forward_unpadded, mel), _encode(encoder, mel), rtol=0, atol=1e-6)
    # ... and takes shorter (here odd) lengths, like Whisper's stride-2 convolution.
    assert tuple(_encode(encoder, mel[:, :, :999]).shape) == (2, 500, D_MODEL)
    with pytest.raises(ValueError, match="split_into_windows"):
        encoder(torch.zeros(1, N_MELS, FRAMES + 2))


def test_key_maps_are_inverse() -> None:
    names = SpeechEncoder(tiny_whisper_config(N_MELS, D_MODEL, layers=2, heads=2)).encoder.state_dict().keys()
    for name in names:
        openai_name = hf_key_to_openai(name)
        assert openai_name is not None and openai_name.startswith("encoder.")
        assert openai_key_to_hf(openai_name) == name
    # openai-whisper's module names (whisper/model.py), written out so a swapped pair cannot hide
    # behind the round trip (the tiny .pt is made with the inverse map).
    spelled_out = {
        "encoder.conv1.weight": "conv1.weight",
        "encoder.conv2.bias": "conv2.bias",
        "encoder.positional_embedding": "embed_positions.weight",
        "encoder.blocks.3.attn.query.weight": "layers.3.self_attn.q_proj.weight",
        "encoder.blocks.3.attn.key.weight": "layers.3.self_attn.k_proj.weight",
        "encoder.blocks.3.attn.value.bias": "layers.3.self_attn.v_proj.bias",
        "encoder.blocks.3.attn.out.weight": "layers.3.self_attn.out_proj.weight",
        "encoder.blocks.3.attn_ln.weight": "layers.3.self_attn_layer_norm.weight",
        "encoder.blocks.3.mlp.0.weight": "layers.3.fc1.weight",
        "encoder.blocks.3.mlp.2.bias": "layers.3.fc2.bias",
        "encoder.blocks.3.mlp_ln.bias": "layers.3.final_layer_norm.bias",
        "encoder.ln_post.weight": "layer_norm.weight",
    }
    for openai_name, hf_name in spelled_out.items():
        assert openai_key_to_hf(openai_name) == hf_name
    for unknown in ("encoder.blocks.0.attn.qry.weight", "decoder.ln.weight", "encoder.blocks.x.mlp.0.weight"):
        assert openai_key_to_hf(unknown) is None


def _rewrite_pt(source: Path, target: Path, edit) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    edit(checkpoint["model_state_dict"])
    torch.save(checkpoint, target)
    return target


def test_renamed_key_in_pt_is_named(tiny_pt: Path, tmp_path: Path) -> None:
    def rename(state: dict) -> None:
        state["encoder.blocks.1.attn.qry.weight"] = state.pop("encoder.blocks.1.attn.query.weight")

    broken = _rewrite_pt(tiny_pt, tmp_path / "renamed.pt", rename)
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.1\.attn\.qry\.weight"):
        load_speech_encoder(broken)


def test_missing_key_in_pt_is_named_in_openai_terms(tiny_pt: Path, tmp_path: Path) -> None:
    broken = _rewrite_pt(tiny_pt, tmp_path / "missing.pt", lambda state: state.pop("encoder.blocks.1.mlp_ln.bias"))
    with pytest.raises(CheckpointError, match=r"lacks encoder tensors encoder\.blocks\.1\.mlp_ln\.bias"):
        load_speech_encoder(broken)


def test_extra_keys_are_named(tiny_pt: Path, tiny_dir: Path, tmp_path: Path) -> None:
    def add_known_looking(state: dict) -> None:
        state["encoder.blocks.2.attn.query.weight"] = torch.zeros(D_MODEL, D_MODEL)  # a third block

    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.2\.attn\.query\.weight"):
        load_speech_encoder(_rewrite_pt(tiny_pt, tmp_path / "extra.pt", add_known_looking))
    with pytest.raises(CheckpointError, match=r"encoder\.lm_head\.weight"):
        load_speech_encoder(
            _rewrite_pt(tiny_pt, tmp_path / "odd.pt", lambda s: s.update({"encoder.lm_head.weight": torch.zeros(1)}))
        )

    # The same in a transformers directory: an extra encoder key, and a key of no Whisper part.
    for extra in ("model.encoder.layers.0.self_attn.k_proj.bias", "classifier.weight"):
        directory = tmp_path / extra
        directory.mkdir()
        (directory / "config.json").write_text((tiny_dir / "config.json").read_text())
        tensors = load_file(tiny_dir / "model.safetensors")
        tensors[extra] = torch.zeros(D_MODEL)
        save_file(tensors, directory / "model.safetensors")
        with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
            load_speech_encoder(directory)


def test_shape_mismatch_names_key_and_both_shapes(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["model.encoder.layers.1.fc1.weight"] = torch.zeros(7, D_MODEL)
    save_file(tensors, tmp_path / "model.safetensors")
    shapes = r"model\.encoder\.layers\.1\.fc1\.weight has shape \(7, 32\).*\(128, 32\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_speech_encoder(tmp_path)


def test_paths_that_are_not_whisper_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_speech_encoder(tmp_path / "nowhere.pt")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not weights")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    (llama_dir / "config.json").write_text(json.dumps({"model_type": "omni_speech2s_llama"}))
    plain_tensors = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain_tensors)
    for path in (text_file, empty_dir, llama_dir, plain_tensors):
        with pytest.raises(CheckpointError, match="neither a Whisper checkpoint directory nor an openai-whisper"):
            load_speech_encoder(path)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_speech_encoder(weightless)


class _NotATensor:
    """Any Python object: unpickling it could run arbitrary code, so weights_only must refuse it."""

    def __init__(self) -> None:
        self.payload = 42


def test_pickled_python_objects_are_refused(tiny_pt: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(tiny_pt, map_location="cpu", weights_only=True)
    checkpoint["extra"] = _NotATensor()
    hostile = tmp_path / "hostile.pt"
    torch.save(checkpoint, hostile)
    with pytest.raises(CheckpointError, match=r"_NotATensor.*weights_only"):
        load_speech_encoder(hostile)
