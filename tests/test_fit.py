"""GPU memory estimates: parameter counts equal the loaded model's, arithmetic by hand, fit suggestions."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import omni_cli.setup.fit as fit
from omni_cli.errors import ConfigError
from omni_cli.setup.fit import (
    CONTEXT_TOKENS,
    REPLY_TOKENS,
    WORKSPACE_BYTES,
    ModelSizes,
    check_device_fits,
    check_fits,
    estimate_gpu_memory,
    sizes_for_files,
    sizes_for_model,
    sizes_for_preset,
)
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.weights.presets import GB, get_preset, load_preset, resolve_preset

ROOT = Path(__file__).resolve().parents[1]


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_counts_from_config_equal_the_loaded_tiny_model(tiny_model, tiny_loaded) -> None:
    # A checkpoint directory (no preset): every count comes from the config.json files on disk.
    bare = sizes_for_model(resolve_preset(tiny_model.model_dir))
    resolved = replace(resolve_preset(tiny_model.model_dir), speech_encoder=tiny_model.speech_encoder, vocoder_dir=tiny_model.vocoder_dir)
    sizes = sizes_for_model(resolved)
    # Without --speech-encoder the encoder named in config.json is counted, as the loader would load it.
    assert bare == replace(sizes, vocoder=0)
    m = tiny_loaded
    linear = sum(mod.weight.numel() for mod in m.llm.model.layers.modules() if isinstance(mod, torch.nn.Linear))
    assert sizes.llm_linear == linear
    assert sizes.llm_linear + sizes.llm_other == _numel(m.llm)
    assert sizes.speech_encoder == _numel(m.encoder)
    assert sizes.adaptor == _numel(m.adaptor)
    assert sizes.speech_decoder == _numel(m.unit_decoder)
    assert sizes.vocoder == _numel(load_vocoder(tiny_model.vocoder_dir))
    cfg = m.llm.config
    assert sizes.llm_kv_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)


def test_released_sizes_give_the_known_llama_count() -> None:
    sizes = sizes_for_preset(get_preset("llama-omni-8b"))
    assert sizes.llm_linear + sizes.llm_other == 8_030_261_248  # Llama-3.1-8B
    assert sizes.llm_kv_per_token == 2 * 32 * 8 * 128
    assert sizes.decoder_kv_per_token == 2 * 2 * 4096 * 25


def test_estimate_by_hand() -> None:
    s = ModelSizes(llm_linear=1000, llm_other=200, speech_encoder=30, adaptor=4, speech_decoder=50, vocoder=6, llm_kv_per_token=8, decoder_kv_per_token=3)
    caches = 8 * CONTEXT_TOKENS + 3 * REPLY_TOKENS
    assert estimate_gpu_memory(s, "fp32") == 4 * (1290 + caches) + WORKSPACE_BYTES
    assert estimate_gpu_memory(s, "fp16") == estimate_gpu_memory(s, "bf16") == estimate_gpu_memory(s, "auto") == 2 * (1290 + caches) + WORKSPACE_BYTES
    assert estimate_gpu_memory(s, "8bit") == 1000 * 1 + 2 * (200 + 90 + caches) + WORKSPACE_BYTES
    assert estimate_gpu_memory(s, "4bit") == int(1000 * 0.5625 + 2 * (200 + 90 + caches) + WORKSPACE_BYTES)
    with pytest.raises(ConfigError, match="unknown precision"):
        estimate_gpu_memory(s, "3bit")


def test_check_fits_suggests_the_best_precision_that_fits() -> None:
    sizes = sizes_for_preset(get_preset("llama-omni-8b"))
    need = {p: estimate_gpu_memory(sizes, p) for p in ("fp16", "8bit", "4bit")}
    assert need["fp16"] > need["8bit"] > need["4bit"]
    assert check_fits(need["fp16"], sizes, "fp16") == need["fp16"]
    with pytest.raises(ConfigError, match=r"needs ~20\.1 GB of GPU memory at fp16 but the GPU has 15\.0 GB free; try --precision 8bit") as info:
        check_fits(int(15 * GB), sizes, "auto", "llama-omni-8b")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="try --precision 4bit"):
        check_fits(need["4bit"], sizes, "8bit")
    with pytest.raises(ConfigError, match="even --precision 4bit needs"):
        check_fits(need["4bit"] - 1, sizes, "fp16")


def test_check_device_fits_reads_the_gpu_before_loading(monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    from omni_cli.weights.model_files import read_model_files

    files = read_model_files(tiny_model.model_dir, tiny_model.speech_encoder)  # as a run reads them, once
    need = {p: estimate_gpu_memory(sizes_for_files(files), p) for p in ("fp16", "4bit")}
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: None)
    check_device_fits(files, "fp16")  # CPU: nothing to check
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: ("Fake GPU", need["4bit"], need["fp16"]))
    with pytest.raises(ConfigError, match=rf"{re.escape(files.name)} needs .* free; try --precision 4bit"):
        check_device_fits(files, "fp16")
    check_device_fits(files, "4bit")


def test_models_readme_table_matches_the_estimates() -> None:
    sizes = sizes_for_preset(get_preset("llama-omni-8b"))
    row = next(line for line in (ROOT / "models" / "README.md").read_text().splitlines() if line.startswith("| `llama-omni-8b`"))
    shown = [float(x) for x in re.findall(r"\| (\d+\.\d) GB", row)]
    expected = [round(estimate_gpu_memory(sizes, p) / GB, 1) for p in ("fp16", "8bit", "4bit")]
    assert shown == expected, f"models/README.md says {shown}, the estimate is {expected}"


def test_a_preset_that_cannot_size_the_model_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text((ROOT / "models" / "llama-omni-8b.toml").read_text().replace("hidden_size = 4096\n", "", 1))
    with pytest.raises(ConfigError, match="preset custom.toml: its config tables cannot size the model") as info:
        sizes_for_preset(load_preset(path))
    assert "\n" not in str(info.value)


def test_a_gpu_this_machine_lacks_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1\."):
        fit.cuda_memory("cuda:2")
    assert fit.cuda_memory("cpu") is None
