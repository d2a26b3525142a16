"""Checkpoints on disk: what a resume point and the exported model hold, Ctrl-C at a periodic save, which
checkpoint --resume picks, fsync before rename, stale temporary folders, paths stored for resuming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import CheckpointError, ConfigError, OmniError
from omni_cli.train import checkpoints, trainer
from omni_cli.train.checkpoints import (
    clean_stale_saves,
    save_model,
    save_resume_point,
)
from omni_cli.train.run_settings import RUN_FILE, find_checkpoint, run_file_data
from omni_cli.train.trainer import FinetuneConfig, finetune
from omni_cli.train.trainer_state import TRAINER_STATE_FILE, load_trainer_state
from saved_tensors import saved_tensors


def _manifest(tmp_path: Path) -> Path:
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris.", "tgt_units": [5, 9, 2]}) + "\n")
    return manifest


def test_ctrl_c_during_a_step_that_ends_in_a_periodic_save_writes_it_once(tiny_model, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    writes: list[Path] = []
    real_save = trainer.save_resume_point
    monkeypatch.setattr(trainer, "save_resume_point", lambda *a: writes.append(a[2]) or real_save(*a))

    def ctrl_c_at_2(log) -> None:
        if log.step == 2:
            signal.raise_signal(signal.SIGINT)  # just before the periodic save of step 2

    cfg = FinetuneConfig(stage=1, data=_manifest(tmp_path), output=out, model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=4, batch_size=1,
                         lr=1e-3, save_every=2, keep_checkpoints=1)
    result = finetune(cfg, on_log=ctrl_c_at_2)
    assert result.interrupted and result.steps == 2 and result.unsaved is None
    assert result.last_checkpoint == out / "checkpoint-2" and writes == [out / "checkpoint-2"]
    assert load_trainer_state(result.last_checkpoint)["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "train_log.jsonl"]


def test_a_second_ctrl_c_quits_at_once_keeping_the_last_checkpoint(tiny_model, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_collate = trainer.collate

    def collate_until_checkpoint_2(items):  # KeyboardInterrupt = the second Ctrl-C, mid-step
        if (out / "checkpoint-2").is_dir():
            raise KeyboardInterrupt
        return real_collate(items)

    monkeypatch.setattr(trainer, "collate", collate_until_checkpoint_2)
    cfg = FinetuneConfig(stage=2, data=_manifest(tmp_path), output=out, model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=4, batch_size=1,
                         lr=1e-3, save_every=2)
    result = finetune(cfg)
    assert result.interrupted and result.steps == 2 and result.last_checkpoint == out / "checkpoint-2"
    assert result.unsaved is None  # step 2 is on disk; the half-done step 3 is simply not taken
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "train_log.jsonl"]


def _fake_checkpoint(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    torch.save({"step": step}, path / TRAINER_STATE_FILE)
    cfg = FinetuneConfig(stage=2, data=path / "m.jsonl", output=path.parent)
    (path / RUN_FILE).write_text(json.dumps(run_file_data(cfg, step, path / "model", path / "whisper", ["q"])))


def test_resume_picks_the_checkpoint_with_the_most_steps_and_refuses_a_model(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    _fake_checkpoint(tmp_path / "checkpoint-6", 6)
    (tmp_path / "checkpoint-9").mkdir()  # an unfinished folder without state is ignored
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    _fake_checkpoint(tmp_path / "checkpoint-10", 3)  # the step inside counts, not the folder name
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert find_checkpoint(tmp_path / "checkpoint-10") == tmp_path / "checkpoint-10"
    # final/ is the exported model: resuming it is refused with what to do instead.
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a resume point.*--model"):
        find_checkpoint(tmp_path / "final")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsync'd paths from /proc/self/fd (Linux)")
def test_every_checkpoint_file_is_fsynced_before_the_rename(tiny_model, tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", recording_fsync)
    for out in (save_model({"w": torch.ones(3)}, tiny_model.model_dir, tmp_path / "model", tiny_model.speech_encoder),
                save_resume_point({"w": torch.ones(3)}, {"step": 1}, tmp_path / "ck")):
        written = {p.name for p in out.iterdir()}
        assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json"} <= written
        # Synced under the temporary name, i.e. before the folder was renamed into place.
        mine = [p for p in synced if p.parent.name.startswith(f".{out.name}.tmp-")]
        assert {p.name for p in mine} == written
    assert "config.json" in {p.name for p in (tmp_path / "model").iterdir()}
    assert TRAINER_STATE_FILE in {p.name for p in (tmp_path / "ck").iterdir()}


def test_an_interrupted_save_leaves_no_temporary_folder_and_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save_resume_point({"w": torch.zeros(2)}, {"step": 1}, tmp_path / "checkpoint-1")

    def killed_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_shards", killed_write)
    with pytest.raises(KeyboardInterrupt):
        save_resume_point({"w": torch.ones(2)}, {"step": 1}, tmp_path / "checkpoint-1")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert torch.equal(saved_tensors(tmp_path / "checkpoint-1")["w"], torch.zeros(2))


def test_stale_temporary_folders_of_dead_processes_are_tidied(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".checkpoint-7.tmp-{dead}").mkdir()  # a save killed mid-write
    (tmp_path / f".final.old-{dead}").mkdir()  # killed between the two renames: final/ is missing
    (tmp_path / f".final.old-{dead}" / "config.json").write_text("{}")
    (tmp_path / f".checkpoint-8.tmp-{os.getppid()}").mkdir()  # a live process's save in progress
    clean_stale_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint-8.tmp-{os.getppid()}", "final"]
    assert (tmp_path / "final" / "config.json").is_file()


def _fp16_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = {k: v.half() for k, v in load_file(str(shard)).items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    return dest


def test_resume_points_hold_only_trained_parts_and_the_export_keeps_the_base_dtype(tiny_model, tmp_path: Path) -> None:
    base = _fp16_copy(tiny_model.model_dir, tmp_path / "fp16-base")
    cfg = FinetuneConfig(stage=2, data=_manifest(tmp_path), output=tmp_path / "out", model=base,
                         speech_encoder=tiny_model.speech_encoder, max_steps=2, batch_size=1, lr=1e-3, save_every=1)
    result = finetune(cfg)
    point = tmp_path / "out" / "checkpoint-1"
    assert result.last_checkpoint == point
    # Stage 2's resume point: the speech decoder's float32 master weights, the trainer state and the run's settings.
    trained = saved_tensors(point)
    assert trained and all(k.startswith("unit_decoder.") and v.dtype == torch.float32 for k, v in trained.items())
    assert sorted(p.name for p in point.iterdir()) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json",
                                                        RUN_FILE, TRAINER_STATE_FILE]
    # final/: the complete released layout in the base's dtype, no optimizer state; the frozen LLM is the base's own.
    final = result.output_dir
    assert not (final / TRAINER_STATE_FILE).exists()
    before, after = saved_tensors(base), saved_tensors(final)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == before[k].dtype == torch.float16 for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("speech_generator."))
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "float16"
    assert not torch.equal(before["speech_generator.output_proj.weight"], after["speech_generator.output_proj.weight"])


def test_resume_stores_absolute_paths_and_honours_a_moved_model(tiny_model, tmp_path: Path, monkeypatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    shutil.copytree(tiny_model.model_dir, first / "model")
    shutil.copytree(tiny_model.speech_encoder, first / "whisper")
    manifest = _manifest(tmp_path)
    monkeypatch.chdir(first)
    cfg = FinetuneConfig(stage=1, data=manifest, output=tmp_path / "out", model=Path("model"), speech_encoder=Path("whisper"),
                         max_steps=2, batch_size=1, lr=1e-2, lora=True, lora_rank=4, lora_alpha=8, save_every=1)
    finetune(cfg)
    point = tmp_path / "out" / "checkpoint-1"
    state = load_trainer_state(point)
    assert state["base_model"] == str((first / "model").resolve())
    assert state["speech_encoder"] == str((first / "whisper").resolve())
    # LoRA: the resume point holds the adaptor and the adapters only.
    assert all(k.startswith("adaptor.") or "lora_" in k for k in saved_tensors(point))

    # From another directory the stored paths still work; once the model moved, --model names it.
    monkeypatch.chdir(second)
    resumed = finetune(FinetuneConfig(**{**cfg.__dict__, "model": None, "speech_encoder": None, "resume": point, "output": tmp_path / "a"}))
    assert resumed.steps == 2 and resumed.output_dir is not None
    (first / "model").rename(second / "moved")
    with pytest.raises(OmniError, match="--model"):
        finetune(FinetuneConfig(**{**cfg.__dict__, "model": None, "speech_encoder": None, "resume": point, "output": tmp_path / "b"}))
    moved = finetune(FinetuneConfig(**{**cfg.__dict__, "model": Path("moved"), "speech_encoder": None, "resume": point, "output": tmp_path / "c"}))
    assert moved.steps == 2
    for name, tensor in saved_tensors(resumed.output_dir).items():
        assert torch.equal(tensor, saved_tensors(moved.output_dir)[name]), name


def test_unknown_precision_is_refused_in_one_line(tmp_path: Path) -> None:
    for precision in ("8bit", "bf61"):
        with pytest.raises(ConfigError, match="--precision"):
            finetune(FinetuneConfig(stage=1, data=tmp_path / "m.jsonl", output=tmp_path / "o", precision=precision))
    result = CliRunner().invoke(app, ["finetune", "--stage", "1", "--data", str(tmp_path / "m.jsonl"), "--output",
                                      str(tmp_path / "o"), "--precision", "8bit", "--device", "cpu"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("omni: error: Invalid value for '--precision': '8bit' is not one of"), result.stderr
    assert not (tmp_path / "o").exists()
