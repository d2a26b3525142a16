"""`omni finetune` given bad inputs and interrupted, through the real CLI: the exit code, exactly one error
line and no traceback on stderr, and what is on disk afterwards (no temporary folders, earlier checkpoints kept)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.train import checkpoints
from omni_cli.train.trainer_state import TRAINER_STATE_FILE, load_trainer_state


def _manifest(root: Path, units: object = (5, 9, 2)) -> Path:
    t = np.arange(8000) / 16000
    sf.write(root / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    manifest = root / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris.", "tgt_units": units}) + "\n")
    return manifest


def _finetune(tiny_model, manifest: Path, out: Path, *args: str):
    argv = ["finetune", "--stage", "2", "--data", str(manifest), "--output", str(out), "--model", str(tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder), "--batch-size", "1", "--lr", "1e-3", *args]
    return CliRunner().invoke(app, argv)


def _one_error_line(result) -> str:
    """The single `omni: error:` line a failed command printed (and no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return errors[0]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.exists() else []


def _run_with_checkpoint(tiny_model, root: Path) -> Path:
    """A finished 2-step run whose output holds checkpoint-1 (to resume)."""
    out = root / "out"
    result = _finetune(tiny_model, _manifest(root), out, "--max-steps", "2", "--save-every", "1")
    assert result.exit_code == 0, result.stderr
    return out / "checkpoint-1"


def _truncated(state: Path) -> None:
    state.write_bytes(state.read_bytes()[:200])


def _random(state: Path) -> None:
    state.write_bytes(np.random.default_rng(0).bytes(4096))


class _Payload:
    def __reduce__(self):  # unpickling would create a file: never run by a weights-only load
        return (os.system, ("touch pwned",))


def _malicious(state: Path) -> None:
    torch.save({"step": 1, "evil": _Payload()}, state)


@pytest.mark.parametrize("spoil, expected", [
    (_truncated, "is not a trainer state written by omni finetune"),
    (_random, "is not a trainer state written by omni finetune"),
    (_malicious, "holds a Python object (posix.system) besides tensors; refusing to unpickle it"),
], ids=["truncated", "random", "malicious"])
def test_resume_with_a_damaged_or_hostile_trainer_state(tiny_model, tmp_path: Path, monkeypatch, spoil, expected) -> None:
    point = _run_with_checkpoint(tiny_model, tmp_path)
    spoil(point / TRAINER_STATE_FILE)
    monkeypatch.chdir(tmp_path)
    result = _finetune(tiny_model, tmp_path / "m.jsonl", tmp_path / "out", "--resume", str(point))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert expected in line and "weights_only=False" not in result.stderr, line
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-1", "final", "train_log.jsonl"]


def _not_utf8(root: Path) -> list[str]:
    record = {"id": "q", "speech": "q.wav", "response": "Caf\u00e9.", "tgt_units": [5]}
    (root / "m.jsonl").write_bytes(json.dumps(record, ensure_ascii=False).encode("latin-1") + b"\n")
    return []


def _units_with_a_typo(root: Path) -> list[str]:
    _manifest(root, units="1, x, 3")
    return []


def _zero_epochs(root: Path) -> list[str]:
    return ["--epochs", "0"]


def _qlora_on_cpu(root: Path) -> list[str]:
    (root / "m.jsonl").write_text(json.dumps({"id": "q", "speech": "q.wav", "response": "Paris."}) + "\n")
    return ["--stage", "1", "--qlora", "--device", "cpu"]


@pytest.mark.parametrize("setup, code, expected, absent", [
    (_not_utf8, 2, "is not UTF-8 text (byte 0xe9", "Traceback"),
    (_units_with_a_typo, 2, "1 of 1 records cannot be used", "invalid literal"),
    (_zero_epochs, 2, "Invalid value for '--epochs': must be a number more than 0", "Traceback"),
    (_qlora_on_cpu, 2, "--qlora keeps the LLM in 4 bit (bitsandbytes), which needs a CUDA GPU, but this run is on cpu", "--precision"),
], ids=["non-utf8-manifest", "units-typo", "epochs-0", "qlora-on-cpu"])
def test_bad_inputs_are_refused_before_training(tiny_model, tmp_path: Path, setup: Callable, code: int, expected: str, absent: str) -> None:
    _manifest(tmp_path)
    extra = setup(tmp_path)
    result = _finetune(tiny_model, tmp_path / "m.jsonl", tmp_path / "out", "--max-steps", "2", *extra)
    assert result.exit_code == code, result.stderr
    line = _one_error_line(result)
    assert expected in line and absent not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


def test_units_typo_is_one_message_for_its_record(tiny_model, tmp_path: Path) -> None:
    _units_with_a_typo(tmp_path)
    result = _finetune(tiny_model, tmp_path / "m.jsonl", tmp_path / "out", "--max-steps", "2")
    problems = [line for line in result.stderr.splitlines() if line.startswith("  q: ")]
    assert problems == ["  q: unit targets must be integers, but item 2 is 'x'"], result.stderr


def test_a_double_ctrl_c_during_a_save_leaves_no_temporary_folder(tiny_model, tmp_path: Path, monkeypatch) -> None:
    real_write = checkpoints.write_shards
    saves: list[Path] = []

    def write_and_ctrl_c_twice_in_the_third_save(tensors, out_dir, *args, **kwargs):
        saves.append(out_dir)
        written = real_write(tensors, out_dir, *args, **kwargs)  # half a checkpoint on disk ...
        if len(saves) == 3:
            signal.raise_signal(signal.SIGINT)  # ... Ctrl-C: stop after this step
            signal.raise_signal(signal.SIGINT)  # ... and again: quit now
        return written

    monkeypatch.setattr(checkpoints, "write_shards", write_and_ctrl_c_twice_in_the_third_save)
    out = tmp_path / "out"
    result = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "5", "--save-every", "1")
    assert result.exit_code == 130
    line = _one_error_line(result)
    assert "step 3 was not saved" in line and f"--resume {out / 'checkpoint-2'}" in line, line
    assert saves[-1].name.startswith(".checkpoint-3.tmp-")
    assert _leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "train_log.jsonl"]
    assert load_trainer_state(out / "checkpoint-2")["step"] == 2


def test_stale_temporary_folders_are_removed_when_a_run_starts(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".checkpoint-7.tmp-999999999").mkdir(parents=True)  # a save killed long ago (no such process)
    result = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "1")
    assert result.exit_code == 0, result.stderr
    assert _leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == ["final", "train_log.jsonl"]


def test_checkpoints_from_before_a_resume_are_pruned(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _finetune(tiny_model, _manifest(tmp_path), out, "--max-steps", "5", "--save-every", "1", "--keep-checkpoints", "0")
    assert first.exit_code == 0, first.stderr
    for name in ("checkpoint-2", "checkpoint-3", "checkpoint-4", "final"):  # as if it stopped after saving step 1
        shutil.rmtree(out / name)
    point = out / "checkpoint-1"
    result = _finetune(tiny_model, tmp_path / "m.jsonl", out, "--keep-checkpoints", "2", "--resume", str(point))
    assert result.exit_code == 0, result.stderr
    assert "resuming after step 1" in result.stderr
    # Two kept (the default), the newest: the resumed-from checkpoint-1 is pruned like the run's own.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-4", "final", "train_log.jsonl"]
    assert _leftovers(out) == []
