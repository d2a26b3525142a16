"""`omni finetune` under torchrun: two CPU processes (gloo, DDP) run a stage-2 step and save one checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from omni_cli.train.checkpoints import TRAINER_STATE_FILE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_stage2_step_saves_one_checkpoint(tiny_model, tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    records = []
    for i, freq in enumerate((220, 330, 440, 550)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Hello!", "tgt_units": [i + 1, 7, 9]})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "omni_cli.cli", "finetune", "--stage", "2", "--data", str(manifest), "--output", str(out),
        "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
        "--max-steps", "1", "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuned model:" in done.stdout
    # One checkpoint (the final one), written once by rank 0; no temporary leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["final"]
    state = torch.load(out / "final" / TRAINER_STATE_FILE, weights_only=True)
    assert state["step"] == 1
    before = {}
    for shard in tiny_model.model_dir.glob("*.safetensors"):
        before.update(load_file(str(shard)))
    after = {}
    for shard in (out / "final").glob("*.safetensors"):
        after.update(load_file(str(shard)))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("speech_generator.") for k in changed)


def test_fsdp_stage1_on_two_processes_matches_one_process_training(tiny_model, tmp_path: Path) -> None:
    from omni_cli.train.trainer import FinetuneConfig, finetune

    t = np.arange(8000) / 16000
    records = []
    for i, freq in enumerate((220, 330, 440, 550)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        # Same reply length everywhere: 2 ranks × 1 sample and 1 process × 2 samples then average alike.
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Hello!"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--stage", "1", "--data", str(manifest), "--model", str(tiny_model.model_dir),
              "--speech-encoder", str(tiny_model.speech_encoder), "--max-steps", "2", "--grad-accum", "1",
              "--lr", "1e-3", "--seed", "3", "--save-every", "1", "--batch-size", "1", "--fsdp"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def launch(*args: str) -> None:
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "omni_cli.cli", "finetune", *common, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=Path(__file__).resolve().parents[2])
        assert done.returncode == 0, done.stderr[-3000:]

    launch("--output", str(tmp_path / "fsdp"))
    # Resuming the sharded run from its step-1 checkpoint (sharded optimizer state) lands on the same weights.
    launch("--output", str(tmp_path / "resumed"), "--resume", str(tmp_path / "fsdp" / "checkpoint-1"))

    single = finetune(FinetuneConfig(stage=1, data=manifest, output=tmp_path / "single", model=tiny_model.model_dir,
                                     speech_encoder=tiny_model.speech_encoder, max_steps=2, batch_size=2, grad_accum=1,
                                     lr=1e-3, seed=3, save_every=0))
    a, b, c = {}, {}, {}
    for shard in (tmp_path / "fsdp" / "final").glob("*.safetensors"):
        a.update(load_file(str(shard)))
    for shard in single.output_dir.glob("*.safetensors"):
        b.update(load_file(str(shard)))
    for shard in (tmp_path / "resumed" / "final").glob("*.safetensors"):
        c.update(load_file(str(shard)))
    assert c.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=1e-6, msg=name)
    base = {}
    for shard in tiny_model.model_dir.glob("*.safetensors"):
        base.update(load_file(str(shard)))
    assert a.keys() == b.keys() == base.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = {k for k in a if not torch.equal(a[k], base[k])}
    assert "model.speech_projector.linear1.weight" in moved and "model.layers.0.mlp.up_proj.weight" in moved
    assert not any(k.startswith("speech_generator.") for k in moved)
    assert torch.load(tmp_path / "fsdp" / "final" / TRAINER_STATE_FILE, weights_only=True)["fsdp"] is True
