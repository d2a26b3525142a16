"""The loss log: every step in OUTPUT/train_log.jsonl once (a resume drops what it re-runs), TensorBoard
events with --report-to tensorboard (one line when the package is missing), and plain progress lines every
N steps when stderr is a file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.train.train_log import keep_steps_up_to

KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed_s"}


def _manifest(root: Path) -> Path:
    t = np.arange(8000) / 16000
    records = []
    for i in range(3):
        sf.write(root / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Paris.", "tgt_units": [i + 1, 9]})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "m.jsonl"


def _finetune(tiny_model, root: Path, *args: str):
    argv = ["finetune", "--stage", "2", "--data", str(_manifest(root)), "--output", str(root / "out"), "--model",
            str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder), "--batch-size", "1", "--lr", "1e-3", *args]
    return CliRunner().invoke(app, argv)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_every_step_is_logged_and_printed_every_n_steps_to_a_file(tiny_model, tmp_path: Path) -> None:
    result = _finetune(tiny_model, tmp_path, "--max-steps", "5", "--log-every", "2", "--warmup-ratio", "0")
    assert result.exit_code == 0, result.stderr
    rows = _rows(tmp_path / "out")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5] and all(set(row) == KEYS for row in rows)
    assert rows[0]["lr"] == 1e-3 and rows[-1]["lr"] < rows[0]["lr"]  # the rate each update used: cosine decay
    assert all(row["loss"] > 0 and row["grad_norm"] > 0 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert rows[-1]["epoch"] == pytest.approx(5 / 3)
    # CliRunner's stderr is not a terminal: whole lines every 2 steps and the last, no live bar.
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"], result.stderr
    for line, row in zip(lines, (rows[1], rows[3], rows[4])):
        assert f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad norm {row['grad_norm']:.3g}" in line and "tokens/s" in line, line
    assert "━" not in result.stderr  # rich's bar


def test_a_log_line_torn_by_a_crash_and_the_steps_after_the_resume_point_are_dropped(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    keep_steps_up_to(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    keep_steps_up_to(log, 9)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard (a test extra) is not installed")
def test_tensorboard_gets_the_same_numbers_and_a_resume_purges_what_it_re_runs(tiny_model, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _finetune(tiny_model, tmp_path, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--report-to", "tensorboard")
    assert first.exit_code == 0, first.stderr
    out = tmp_path / "out"
    # Resume from step 2 (as after a crash at step 3): steps 3 and 4 are run and logged again, once.
    resumed = CliRunner().invoke(app, ["finetune", "--resume", str(out / "checkpoint-2")])
    assert resumed.exit_code == 0, resumed.stderr
    rows = _rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3, 4], tag
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6), tag


def test_report_to_tensorboard_without_the_package_is_one_line_before_anything_loads(tiny_model, tmp_path: Path, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    result = _finetune(tiny_model, tmp_path, "--max-steps", "2", "--report-to", "tensorboard")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert errors == ["omni: error: --report-to tensorboard needs the tensorboard package: pip install tensorboard (or leave the option out)."]
    assert not (tmp_path / "out").exists()
