"""Micro-batches only save memory: however a global batch is cut (1×8, 2×4, 4×2, 8×1), the losses and the
trained weights are the same within float error, in both stages, with replies and unit targets of different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni_cli.train.trainer import FinetuneConfig, finetune

# Replies of 2 to 9 tokens and 2 to 9 unit targets: a per-micro-batch mean would weight them unequally.
REPLIES = ["Paris.", "Hello!", "Eat well.", "Sleep enough.", "Tell me a joke.", "How can I help you today?",
           "Water boils at one hundred degrees.", "I am a helpful speech assistant."]


def _manifest(root: Path) -> Path:
    t = np.arange(8000) / 16000
    records = []
    for i, reply in enumerate(REPLIES):
        sf.write(root / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 70 * i) * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": reply, "tgt_units": list(range(10 * i + 1, 11 * i + 3))})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


@pytest.mark.parametrize("stage", [1, 2])
def test_any_split_of_the_global_batch_trains_the_same(tiny_model, tmp_path: Path, monkeypatch, stage: int) -> None:
    manifest = _manifest(tmp_path)
    gradients: dict[int, list[torch.Tensor]] = {}
    real_clip = torch.nn.utils.clip_grad_norm_
    micro = 0

    def recording_clip(params, *args, **kwargs):  # the step's whole gradient, before clipping and Adam
        params = list(params)
        gradients.setdefault(micro, [p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    losses = {}
    for micro in (8, 4, 2, 1):
        losses[micro] = finetune(FinetuneConfig(
            stage=stage, data=manifest, output=tmp_path / f"micro-{micro}", model=tiny_model.model_dir,
            speech_encoder=tiny_model.speech_encoder, max_steps=3, batch_size=8, micro_batch_size=micro,
            lr=1e-3, warmup_ratio=0.0, save_every=0, seed=1)).losses
    for micro in (4, 2, 1):
        # The first step's gradient, from the same weights: equal up to float32 sums over other
        # paddings and orders (≤ 2e-4 of each tensor's norm here, CTC's long sums the most); a
        # per-micro-batch mean (the old normalisation) was 5-40 % off.
        for i, (got, want) in enumerate(zip(gradients[micro], gradients[8])):
            assert (got - want).norm() <= 1e-3 * want.norm(), f"micro-batch {micro}, parameter {i}"
        # Each step's loss is the global batch's mean per target. Later steps start from weights that
        # differ by float error (Adam's first steps amplify it for near-zero gradients): ~1e-5 apart;
        # the old normalisation was 1-2 % off.
        assert losses[micro] == pytest.approx(losses[8], rel=1e-4), micro
