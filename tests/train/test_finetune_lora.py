"""Stage 1 with --lora: only adapters (and the adaptor) learn, and the saved checkpoint has them merged in the released layout."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni_cli.errors import ConfigError
from omni_cli.model.loading import load_omni
from omni_cli.train.trainer import FinetuneConfig, finetune
from saved_tensors import saved_tensors

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_stage1_saves_merged_weights_that_reproduce_the_trained_model(tiny_model, tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris."}) + "\n")
    cfg = FinetuneConfig(stage=1, data=manifest, output=tmp_path / "out", model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=3, batch_size=1,
                         lr=1e-2, lora=True, lora_rank=4, lora_alpha=8, save_every=0)
    result = finetune(cfg)
    before, after = saved_tensors(tiny_model.model_dir), saved_tensors(result.output_dir)
    assert before.keys() == after.keys()  # merged: no lora_ keys, released names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.speech_projector.") for k in changed)
    llm_changed = {k for k in changed if not k.startswith("model.speech_projector.")}
    assert llm_changed and all(k.split(".")[-2] in LORA_TARGETS for k in llm_changed), llm_changed

    # The merged checkpoint computes what the trained (unmerged) LoRA model computes.
    loaded = load_omni(result.output_dir, tiny_model.speech_encoder, precision="fp32", device="cpu")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        trained = result.model.llm(input_ids=ids).logits
        merged = loaded.llm(input_ids=ids).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)


def test_lora_flags_are_checked(tiny_model, tmp_path: Path) -> None:
    base = dict(data=tmp_path / "m.jsonl", output=tmp_path / "o", model=tiny_model.model_dir)
    assert FinetuneConfig(stage=1, qlora=True, **base).lora  # --qlora implies --lora
    assert not FinetuneConfig(stage=1, **base).lora
    with pytest.raises(ConfigError, match="stage 1"):
        finetune(FinetuneConfig(stage=2, lora=True, **base))
    with pytest.raises(ConfigError, match="stage 1"):
        finetune(FinetuneConfig(stage=2, qlora=True, **base))


def test_lora_resume_matches_training_straight(tiny_model, tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    for i, freq in enumerate((300, 500)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"q{i}", "speech": f"q{i}.wav", "response": r}) + "\n" for i, r in enumerate(("Paris.", "Hello!"))))

    def cfg(out: str, **kw) -> FinetuneConfig:
        return FinetuneConfig(stage=1, data=manifest, output=tmp_path / out, model=tiny_model.model_dir,
                              speech_encoder=tiny_model.speech_encoder, max_steps=4, batch_size=1,
                              lr=1e-2, lora=True, lora_rank=4, lora_alpha=8, save_every=2, **kw)

    straight = finetune(cfg("straight"))

    def stop_at_2(log) -> None:
        if log.step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C

    cut = finetune(cfg("cut"), on_log=stop_at_2)
    assert cut.interrupted and cut.steps == 2
    resumed = finetune(cfg("cut", resume=tmp_path / "cut"))
    a, b = saved_tensors(straight.output_dir), saved_tensors(resumed.output_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert straight.losses[2:] == pytest.approx(resumed.losses, abs=1e-5)


def test_qlora_checkpoint_is_the_original_weights_plus_the_adapters(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """--qlora trains on a 4-bit base; the saved checkpoint must still be the released layout.

    Run on the CPU (bitsandbytes >= 0.50 quantizes there too; users are sent to a GPU for 4-bit).
    """
    import bitsandbytes as bnb

    from omni_cli.model import loading

    from omni_cli.train import stages

    real = loading.resolve_placement

    def cpu_4bit(precision: str, device: str | None = None) -> loading.Placement:
        return loading.Placement(torch.device("cpu"), torch.float32, "4bit") if precision == "4bit" else real(precision, device)

    monkeypatch.setattr(loading, "resolve_placement", cpu_4bit)
    monkeypatch.setattr(stages, "resolve_placement", cpu_4bit)  # the --qlora device check
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris."}) + "\n")
    rank, alpha = 4, 8
    cfg = FinetuneConfig(stage=1, data=manifest, output=tmp_path / "out", model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=3, batch_size=1,
                         lr=1e-2, qlora=True, lora_rank=rank, lora_alpha=alpha, save_every=0)
    result = finetune(cfg)
    trained = result.model.llm.state_dict()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.llm.modules()), "the base was not 4-bit"

    before, after = saved_tensors(tiny_model.model_dir), saved_tensors(result.output_dir)
    assert before.keys() == after.keys()  # no packed weights, no quantization state: the released names
    for key, value in after.items():
        module = key.removesuffix(".weight")
        a = trained.get(f"base_model.model.{module}.lora_A.default.weight")
        if a is None:
            if not key.startswith("model.speech_projector."):
                assert torch.equal(value, before[key]), key  # frozen: bit-identical to the base
            continue
        b = trained[f"base_model.model.{module}.lora_B.default.weight"]
        # W + B·A·alpha/r, added to the ORIGINAL weight, not to its 4-bit rounding.
        expected = before[key].float() + (b.float() @ a.float()) * (alpha / rank)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert not torch.equal(value, before[key].float()), f"{key}: the adapter did not learn"
    # And it loads (strictly) for inference like any checkpoint.
    load_omni(result.output_dir, tiny_model.speech_encoder, precision="fp32", device="cpu")


def test_saving_never_nudges_the_trained_weights(tiny_model, tmp_path: Path) -> None:
    """Merging is out of place: periodic saves change nothing, and an export leaves the LoRA model as it was."""
    from omni_cli.train.lora import merged_llm_state

    t = np.arange(8000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris."}) + "\n")

    def run(out: str, save_every: int):
        return finetune(FinetuneConfig(stage=1, data=manifest, output=tmp_path / out, model=tiny_model.model_dir,
                                       speech_encoder=tiny_model.speech_encoder, max_steps=3, batch_size=1, lr=1e-2,
                                       lora=True, lora_rank=4, lora_alpha=8, save_every=save_every))

    every, never = run("every", 1), run("never", 0)
    a, b = saved_tensors(every.output_dir), saved_tensors(never.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    llm = every.model.llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    merged = merged_llm_state(llm)
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    assert not any("lora_" in k for k in merged)
    assert all(torch.equal(merged[k], a[k]) for k in merged)  # what the export wrote
    base = saved_tensors(tiny_model.model_dir)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and all(k.split(".")[-2] in LORA_TARGETS for k in changed)  # the adapters, added to new tensors
