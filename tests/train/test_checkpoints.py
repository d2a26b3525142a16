"""Checkpoint bookkeeping: Ctrl-C right after a periodic save, which checkpoint --resume picks, fsync before rename, --precision."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import ConfigError
from omni_cli.train import checkpoints, trainer
from omni_cli.train.checkpoints import TRAINER_STATE_FILE, latest_checkpoint, load_trainer_state, save_checkpoint
from omni_cli.train.trainer import FinetuneConfig, finetune


def _manifest(tmp_path: Path) -> Path:
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris."}) + "\n")
    return manifest


def test_ctrl_c_right_after_a_periodic_save_keeps_that_checkpoint(tiny_model, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_collate = trainer.collate

    def collate_until_checkpoint_2(items):  # Ctrl-C while the batch after the step-2 save is loading
        if (out / "checkpoint-2").is_dir():
            raise KeyboardInterrupt
        return real_collate(items)

    monkeypatch.setattr(trainer, "collate", collate_until_checkpoint_2)
    cfg = FinetuneConfig(stage=1, data=_manifest(tmp_path), output=out, model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=4, batch_size=1, grad_accum=1,
                         lr=1e-3, save_every=2, keep_checkpoints=1)
    result = finetune(cfg)
    assert result.interrupted and result.steps == 2
    assert result.last_checkpoint == out / "checkpoint-2"
    assert load_trainer_state(result.last_checkpoint)["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


def _fake_checkpoint(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    torch.save({"step": step}, path / TRAINER_STATE_FILE)


def test_resume_picks_the_checkpoint_with_the_most_steps_not_final_first(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "final", 4)  # a finished 4-step run, resumed with more steps ...
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    _fake_checkpoint(tmp_path / "checkpoint-6", 6)  # ... and cut at step 6
    (tmp_path / "checkpoint-9").mkdir()  # an unfinished folder without state is ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    _fake_checkpoint(tmp_path / "checkpoint-10", 3)  # the step inside counts, not the folder name
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    (tmp_path / "checkpoint-6" / TRAINER_STATE_FILE).unlink()
    (tmp_path / "checkpoint-6").rmdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "final"  # equal steps: the finished model
    assert latest_checkpoint(tmp_path / "checkpoint-10") == tmp_path / "checkpoint-10"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsync'd paths from /proc/self/fd (Linux)")
def test_every_checkpoint_file_is_fsynced_before_the_rename(tiny_model, tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", recording_fsync)
    out = save_checkpoint({"w": torch.ones(3)}, tiny_model.model_dir, tmp_path / "ck", {"step": 1}, None)
    written = {p.name for p in out.iterdir()}
    assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json", TRAINER_STATE_FILE, "config.json"} <= written
    # Synced under the temporary name, i.e. before the folder was renamed into place.
    assert all(p.parent.name.startswith(".ck.tmp-") for p in synced)
    assert {p.name for p in synced} == written


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
