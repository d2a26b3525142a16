"""`omni finetune` under torchrun on two CPU processes (gloo): the global batch, Ctrl-C, and FSDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from omni_cli.train.trainer_state import TRAINER_STATE_FILE
from omni_cli.train.trainer import FinetuneConfig, finetune
from process_group import kill_group, run_to_end
from saved_tensors import saved_tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage2_manifest(tmp_path: Path) -> Path:
    t = np.arange(8000) / 16000
    records = []
    for i, freq in enumerate((220, 330, 440, 550)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        # Replies and targets of different lengths: the loss is normalised over the whole global batch.
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": ("Hello!", "Eat well.", "Paris.", "Sleep enough.")[i],
                        "tgt_units": list(range(i + 1, 3 * i + 4))})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def _torchrun(tiny_model, *args: str) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "omni_cli.cli", "finetune", "--model", str(tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two torchrun processes start torch and load the model: ~15-30 s on 2 cores
def test_batch_size_is_the_global_batch_over_processes_and_accumulation(tiny_model, tmp_path: Path) -> None:
    manifest = _stage2_manifest(tmp_path)
    out = tmp_path / "out"
    cmd = _torchrun(tiny_model, "--stage", "2", "--data", str(manifest), "--output", str(out), "--max-steps", "2",
                    "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3", "--seed", "5")
    done = run_to_end(cmd, 240, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuned model:" in done.stdout
    # Printed once, by rank 0: 4 = 2 processes × 1 sample × 2 accumulation steps.
    assert done.stderr.count("global batch 4 = 2 processes × 1 samples × 2 accumulation steps; 2 steps (1 per epoch)") == 1
    assert sorted(p.name for p in out.iterdir()) == ["final", "train_log.jsonl"]  # written once by rank 0; no temporary leftovers

    # The same global batch in one process, in one micro-batch, trains to the same weights: the same
    # loss and gradient norm at each step (the loss log), the same weights at the end.
    single = finetune(FinetuneConfig(stage=2, data=manifest, output=tmp_path / "single", model=tiny_model.model_dir,
                                     speech_encoder=tiny_model.speech_encoder, max_steps=2, batch_size=4,
                                     micro_batch_size=4, lr=1e-3, seed=5))
    logs = [[json.loads(line) for line in (where / "train_log.jsonl").read_text().splitlines()] for where in (out, tmp_path / "single")]
    assert [row["step"] for row in logs[0]] == [row["step"] for row in logs[1]] == [1, 2]
    for two, one in zip(*logs):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4) and two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    base, a, b = saved_tensors(tiny_model.model_dir), saved_tensors(out / "final"), saved_tensors(single.output_dir)
    assert base.keys() == a.keys() == b.keys()
    changed = {k for k in base if not torch.equal(base[k], a[k])}
    assert changed and all(k.startswith("speech_generator.") for k in changed)
    for name in a:
        # Two processes sum the gradients in another order than one process does (~1e-6 apart). Adam
        # divides by the root of the squared gradients, so on the few weights whose gradient is
        # near zero that float error can flip the sign of an update (up to ~15 % of the largest
        # update, seen on one element); over a whole tensor it stays ~0.2 % of the update. A wrong
        # split (a sample lost or counted twice, or a per-micro-batch normalisation) moves whole
        # tensors by tens of percent. So: 1 % of each tensor's update, in norm.
        update = (b[name] - base[name]).norm()
        assert (a[name] - b[name]).norm() <= 0.01 * update + 1e-7, name


@pytest.mark.slow  # a torchrun job started, interrupted and its checkpoint resumed: ~20-40 s on 2 cores
def test_ctrl_c_under_torchrun_saves_one_agreed_step_and_exits_cleanly(tiny_model, tmp_path: Path) -> None:
    manifest = _stage2_manifest(tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    cmd = _torchrun(tiny_model, "--stage", "2", "--data", str(manifest), "--output", str(out), "--max-steps", "100000",
                    "--save-every", "0", "--batch-size", "2", "--micro-batch-size", "1", "--lr", "1e-3")
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "global batch" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            time.sleep(1.0)  # a few steps in
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends torchrun, which forwards it to each worker
            stdout, _ = proc.communicate(timeout=180)
        finally:
            kill_group(proc)  # nothing of the job outlives the test, whatever happened
    stderr = log.read_text()
    points = [p for p in out.iterdir() if p.name != "train_log.jsonl"]
    assert [p.name for p in points if p.name.startswith(".")] == []
    assert len(points) == 1 and points[0].name.startswith("checkpoint-"), stderr[-3000:]
    step = int(points[0].name.split("-")[1])
    assert torch.load(points[0] / TRAINER_STATE_FILE, weights_only=True)["step"] == step
    assert f"interrupted at step {step}; resume with --resume {points[0]}" in stderr
    # The workers end without a traceback; torchrun itself still reports the signal it got (SignalException).
    assert "/omni_cli/" not in stderr and stderr.count("Traceback") <= 1, stderr[-3000:]

    # The checkpoint resumes with the run's own settings; one more step, then Ctrl-C again.
    def ctrl_c_after_one_more(log) -> None:
        if log.step == step + 1:
            signal.raise_signal(signal.SIGINT)

    resumed = finetune(FinetuneConfig(stage=2, data=manifest, output=out, max_steps=100000, save_every=0, batch_size=2,
                                      micro_batch_size=1, lr=1e-3, resume=out), on_log=ctrl_c_after_one_more)
    assert resumed.interrupted and resumed.steps == step + 1 and resumed.last_checkpoint == out / f"checkpoint-{step + 1}"


@pytest.mark.slow  # a torchrun job of two processes that diverges at once: ~15-30 s on 2 cores
def test_a_diverged_run_under_torchrun_stops_every_process_without_exporting(tiny_model, tmp_path: Path) -> None:
    manifest = _stage2_manifest(tmp_path)
    out = tmp_path / "out"
    cmd = _torchrun(tiny_model, "--stage", "2", "--data", str(manifest), "--output", str(out), "--max-steps", "50",
                    "--batch-size", "2", "--micro-batch-size", "1", "--lr", "1e30", "--warmup-ratio", "0", "--save-every", "0")
    done = run_to_end(cmd, 240, env=ENV, cwd=ROOT)  # a process left waiting for the other would hang here
    assert done.returncode != 0
    # Each process saw the same reduced loss and stopped at the same step, before applying it.
    stops = [line for line in done.stderr.splitlines() if line.startswith("omni: error: stopped at step ")]
    assert len(stops) == 2 and stops[0] == stops[1], done.stderr[-3000:]
    assert "/omni_cli/" not in done.stderr, done.stderr[-3000:]  # no traceback of ours
    assert not (out / "final").exists()


def test_fsdp_stage1_on_two_processes_matches_one_process_training(tiny_model, tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    records = []
    for i, freq in enumerate((220, 330, 440, 550)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        # Same reply length everywhere: 2 ranks × 1 sample and 1 process × 2 samples then average alike.
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Hello!"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--stage", "1", "--data", str(manifest), "--model", str(tiny_model.model_dir),
              "--speech-encoder", str(tiny_model.speech_encoder), "--max-steps", "2",
              "--lr", "1e-3", "--seed", "3", "--save-every", "1", "--batch-size", "2", "--fsdp"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def launch(*args: str) -> None:
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "omni_cli.cli", "finetune", *common, *args]
        done = run_to_end(cmd, 240, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]

    launch("--output", str(tmp_path / "fsdp"))
    # Resuming the sharded run from its step-1 checkpoint (sharded optimizer state) lands on the same weights.
    launch("--output", str(tmp_path / "resumed"), "--resume", str(tmp_path / "fsdp" / "checkpoint-1"))

    single = finetune(FinetuneConfig(stage=1, data=manifest, output=tmp_path / "single", model=tiny_model.model_dir,
                                     speech_encoder=tiny_model.speech_encoder, max_steps=2, batch_size=2,
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
    assert torch.load(tmp_path / "fsdp" / "checkpoint-1" / TRAINER_STATE_FILE, weights_only=True)["fsdp"] is True
