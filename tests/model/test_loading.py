"""Strict loading of a checkpoint directory in the released layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_cli.config import OmniConfig, SpeechDecoderConfig
from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.model.loading import load_omni, resolve_placement


def _copy(tiny_model, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model.model_dir, dst)
    return dst


def _rewrite_shard(model_dir: Path, edit) -> None:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_tiny_checkpoint_has_the_released_layout(tiny_model) -> None:
    d = tiny_model.model_dir
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "omni_speech2s_llama"
    for key in ("speech_encoder_ds_rate", "speech_encoder_hidden_size", "ctc_decoder_config", "ctc_upsample_factor", "unit_vocab_size"):
        assert key in cfg
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.speech_projector.linear1.weight" in weight_map
    assert "speech_generator.layers.0.self_attn.q_proj.weight" in weight_map
    assert "speech_generator.output_proj.bias" in weight_map
    assert "lm_head.weight" in weight_map and "model.embed_tokens.weight" in weight_map
    assert len(set(weight_map.values())) == 2


def test_loading_round_trips_every_saved_tensor(tiny_model, tiny_loaded) -> None:
    saved: dict[str, torch.Tensor] = {}
    for f in tiny_model.model_dir.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    m = tiny_loaded
    got = dict(m.llm.state_dict())
    got.update({f"model.speech_projector.{k}": v for k, v in m.adaptor.state_dict().items()})
    got.update({f"speech_generator.{k}": v for k, v in m.unit_decoder.state_dict().items()})
    assert set(saved) <= set(got)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k
    assert m.adaptor.linear1.out_features == saved["model.speech_projector.linear1.weight"].shape[0]


def test_renamed_key_fails_naming_it(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)

    def rename(t: dict) -> None:
        key = sorted(t)[0]
        t[key.replace("weight", "wieght")] = t.pop(key)
        rename.key = key  # type: ignore[attr-defined]

    _rewrite_shard(d, rename)
    with pytest.raises(CheckpointError) as err:
        load_omni(d, tiny_model.speech_encoder, precision="fp32", device="cpu")
    msg = str(err.value)
    assert rename.key in msg or rename.key.replace("weight", "wieght") in msg  # type: ignore[attr-defined]
    assert "\n" not in msg


def test_unexpected_key_fails_naming_it(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)
    _rewrite_shard(d, lambda t: t.__setitem__("speech_generator.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="speech_generator.extra_head.weight"):
        load_omni(d, tiny_model.speech_encoder, precision="fp32", device="cpu")


def test_config_with_a_wrong_size_names_the_weight(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*does not match"):
        load_omni(d, tiny_model.speech_encoder, precision="fp32", device="cpu")


def test_not_an_omni_directory(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not 'omni_speech2s_llama'"):
        load_omni(d, tiny_model.speech_encoder, precision="fp32", device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_omni(tmp_path / "nowhere", precision="fp32", device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_omni(empty, precision="fp32", device="cpu")


def test_missing_speech_encoder_is_explained(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["speech_encoder"] = "models/speech_encoder/large-v3.pt"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="--speech-encoder"):
        load_omni(d, precision="fp32", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_quantization_on_cpu_is_refused_clearly(precision: str) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        resolve_placement(precision, None)


def test_decoder_spec_parsing() -> None:
    cfg = SpeechDecoderConfig.parse("(2,4096,32,11008)", 25, 1000)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.blank_id) == (2, 4096, 32, 11008, 1000)
    assert cfg.to_spec() == "(2,4096,32,11008)"
    with pytest.raises(ConfigError, match="layers,hidden,heads,ffn"):
        SpeechDecoderConfig.parse("2-4096", 25, 1000)


def test_config_keeps_unknown_keys(tiny_model, tmp_path: Path) -> None:
    raw = json.loads((tiny_model.model_dir / "config.json").read_text())
    raw["some_future_flag"] = 3
    cfg = OmniConfig.from_dict(raw)
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == raw


def test_missing_adaptor_weight_is_named(tiny_model, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["model.speech_projector.linear1.weight"]
    tensors = load_file(str(shard))
    del tensors["model.speech_projector.linear1.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="missing weight 'model.speech_projector.linear1.weight'"):
        load_omni(d, tiny_model.speech_encoder, precision="fp32", device="cpu")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_load_stores_the_estimated_bytes_and_stays_close(tiny_model, tiny_loaded, monkeypatch, quantization: str) -> None:
    """The --precision 4bit/8bit path through bitsandbytes, run on the CPU.

    Users are sent to a GPU for these precisions (on a CPU they only cost speed); bitsandbytes
    >= 0.50 runs them on the CPU too, which lets CI load the released layout through the same
    from_pretrained + BitsAndBytesConfig path and check what setup/fit.py assumes.
    """
    import bitsandbytes as bnb

    from omni_cli.setup.fit import QUANTIZED_BYTES
    from omni_cli.model import loading
    from omni_cli.model.llm import build_prompt_ids, speech_turn, splice_speech

    monkeypatch.setattr(loading, "resolve_placement", lambda precision, device=None: loading.Placement(torch.device("cpu"), torch.float32, quantization))
    m = load_omni(tiny_model.model_dir, tiny_model.speech_encoder, precision=quantization, device="cpu")
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    linears = [mod for layer in m.llm.model.layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(isinstance(mod, kind) for mod in linears)
    # The head and the embeddings stay unquantized, as setup/fit.py counts them.
    assert type(m.llm.lm_head) is torch.nn.Linear and m.llm.lm_head.weight.dtype == torch.float32

    # Stored bytes per quantized weight: what the GPU estimate multiplies by.
    weights = sum(mod.in_features * mod.out_features for mod in linears)
    if quantization == "4bit":
        stored = sum(mod.weight.numel() + mod.weight.quant_state.absmax.numel() * 4 for mod in linears)
        assert stored == weights * QUANTIZED_BYTES["4bit"]
    else:
        stored = sum(mod.weight.numel() * mod.weight.element_size() for mod in linears)
        assert stored == weights * QUANTIZED_BYTES["8bit"]

    # Same prompt, same weights: the quantized LLM's last hidden states point where fp32's do.
    torch.manual_seed(0)
    ids = build_prompt_ids(m.tokenizer, [speech_turn()])
    speech = torch.randn(12, m.config.hidden_size) * 0.5
    with torch.inference_mode():
        ours = m.llm.model(inputs_embeds=splice_speech(m.llm.get_input_embeddings(), ids, [speech])).last_hidden_state[0]
        ref = tiny_loaded.llm.model(inputs_embeds=splice_speech(tiny_loaded.llm.get_input_embeddings(), ids, [speech])).last_hidden_state[0]
    cos = torch.nn.functional.cosine_similarity(ours.float(), ref, dim=-1)
    # A load that dropped or scrambled weights gives about 0; nf4 rounding leaves ~0.99, int8 ~0.9999.
    assert cos.min() > (0.95 if quantization == "4bit" else 0.999), cos.min()


def test_a_quantized_load_computes_in_the_dtype_asked_for(tiny_model, monkeypatch) -> None:
    # QLoRA in bf16: the frozen 4-bit base must compute in bf16, not in the fp16 a 4-bit load
    # otherwise picks (bitsandbytes casts its inputs to its compute dtype whatever autocast says).
    import bitsandbytes as bnb

    from omni_cli.model import loading

    as_on_cuda = loading.Placement(torch.device("cpu"), torch.float16, "4bit")  # what a GPU's 4-bit load gives
    monkeypatch.setattr(loading, "resolve_placement", lambda precision, device=None: as_on_cuda)
    m = load_omni(tiny_model.model_dir, tiny_model.speech_encoder, precision="4bit", device="cpu", compute_dtype=torch.bfloat16)
    linears = [mod for mod in m.llm.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert linears and {mod.compute_dtype for mod in linears} == {torch.bfloat16}
    assert m.placement.dtype == torch.bfloat16 and m.adaptor.linear1.weight.dtype == torch.bfloat16
