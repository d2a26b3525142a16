"""Nothing a run has done is lost on disk, through the CLI: an output that cannot be written or cannot hold a
checkpoint is refused before training; a save that fails keeps the last good checkpoint and says so in one
line; a diverged run stops at its first non-finite step without exporting; an output that would overwrite
the run's own inputs is refused; a batch larger than the data says what it really trains."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.train import checkpoints, options
from saved_tensors import saved_tensors


def _manifest(root: Path, records: int = 3) -> Path:
    t = np.arange(8000) / 16000
    rows = []
    for i in range(records):
        sf.write(root / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * (250 + 90 * i) * t)).astype(np.float32), 16000)
        rows.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Hello!", "tgt_units": [i + 1, 5, 9]})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def _finetune(tiny_model, manifest: Path, out: Path, *args: str, model: Path | None = None):
    argv = ["finetune", "--stage", "2", "--data", str(manifest), "--output", str(out), "--model", str(model or tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder), "--batch-size", "1", "--lr", "1e-3", *args]
    return CliRunner().invoke(app, argv)


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def _a_file(root: Path) -> Path:
    (root / "taken").write_text("mine")
    return root / "taken"


def _under_a_file(root: Path) -> Path:
    return _a_file(root) / "run"


@pytest.mark.parametrize("make_output, expected", [
    (_a_file, "is a file; give a folder"),
    (_under_a_file, "cannot be created:"),
], ids=["a-file", "under-a-file"])
def test_an_output_that_cannot_be_written_is_refused_before_training(tiny_model, tmp_path: Path, make_output, expected: str) -> None:
    out = make_output(tmp_path)
    result = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "2")
    assert result.exit_code == 2
    assert expected in _one_error_line(result)
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; run as a user to check permissions")
def test_a_read_only_output_is_refused_before_training(tiny_model, tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        result = _finetune(tiny_model, _manifest(tmp_path), tmp_path / "ro" / "out", "--max-steps", "2")
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert result.exit_code == 2 and "is not writable" in _one_error_line(result)


def test_an_output_without_room_for_a_checkpoint_is_refused_before_training(tiny_model, tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(options.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))  # 100 kB free
    result = _finetune(tiny_model, _manifest(tmp_path), tmp_path / "out", "--max-steps", "2")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "has 0.00 GB free, but this run needs" in line and "(a checkpoint: " in line and "free some space or choose another --output" in line
    assert not (tmp_path / "out").exists()


def test_a_save_that_fails_keeps_the_last_good_checkpoint_and_says_so(tiny_model, tmp_path: Path, monkeypatch) -> None:
    real_write = checkpoints.write_shards
    saves: list[Path] = []

    def disk_full_at_the_third_save(tensors, out_dir, *args, **kwargs):
        saves.append(out_dir)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(tensors, out_dir, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "write_shards", disk_full_at_the_third_save)
    out = tmp_path / "out"
    result = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "6", "--save-every", "1")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert line == (f"omni: error: could not write {out / 'checkpoint-3'} (No space left on device); stopped at step 3; "
                    f"the last good checkpoint is {out / 'checkpoint-2'}: resume with --resume {out / 'checkpoint-2'}.")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "train_log.jsonl"]  # no temporary folder
    monkeypatch.setattr(checkpoints, "write_shards", real_write)
    resumed = CliRunner().invoke(app, ["finetune", "--resume", str(out / "checkpoint-2")])
    assert resumed.exit_code == 0 and "resuming after step 2" in resumed.stderr, resumed.stderr


def test_a_diverged_run_stops_at_its_first_non_finite_step_and_exports_nothing(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "20", "--save-every", "1", "--lr", "1e30",
                       "--warmup-ratio", "0")
    assert result.exit_code == 1
    line = _one_error_line(result)
    step = int(line.split("stopped at step ")[1].split(":")[0])
    assert "(the run diverged; a lower --lr usually helps)" in line and f"Step {step} was not applied and no fine-tuned model was written" in line
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in line, line
    assert not (out / "final").exists()
    for point in out.glob("checkpoint-*"):  # every checkpoint kept holds finite weights
        assert all(torch.isfinite(t).all() for t in saved_tensors(point).values()), point
    rows = [json.loads(row) for row in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, step))  # the diverged step is not logged


def test_an_output_that_holds_the_model_or_the_data_is_refused(tiny_model, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_model.model_dir, runs / "s1" / "final")
    manifest = _manifest(tmp_path)
    cases = [
        (runs / "s1", runs / "s1" / "final", manifest, f"--output {runs / 's1'} holds the model ({runs / 's1' / 'final'})"),
        (runs / "s1" / "final", runs / "s1" / "final", manifest, "is the model"),
        (tmp_path, tiny_model.model_dir, manifest, f"--output {tmp_path} is the data ({tmp_path})"),
    ]
    for out, model, data, expected in cases:
        before = sorted(p.name for p in runs.rglob("*"))
        result = _finetune(tiny_model, data, out, "--max-steps", "1", model=model)
        assert result.exit_code == 2
        assert expected in _one_error_line(result), result.stderr
        assert sorted(p.name for p in runs.rglob("*")) == before


def test_a_batch_larger_than_the_data_says_what_each_step_trains(tiny_model, tmp_path: Path) -> None:
    result = _finetune(tiny_model, _manifest(tmp_path), tmp_path / "out", "--batch-size", "100", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    assert "omni: 3 records, fewer than the global batch 100: each step trains on all of them; 2 steps (1 per epoch)" in result.stderr
