"""`omni finetune --resume` continues the run it names, with that run's settings (run.json in each checkpoint):
the README's resume line ends where training straight through ends, a flag that contradicts the run is refused
naming it, and a --resume that is not a checkpoint is one line within a second, before torch is imported."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from saved_tensors import saved_tensors

ROOT = Path(__file__).resolve().parents[2]


def _manifest(root: Path) -> Path:
    t = np.arange(8000) / 16000
    records = []
    for i, reply in enumerate(("Paris.", "Hello!", "Eat well.", "Sleep enough.")):
        sf.write(root / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": reply, "tgt_units": list(range(i + 1, 2 * i + 4))})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 run of 6 steps, batch 2, with every checkpoint kept."""
    root = tmp_path_factory.mktemp("run")
    out = root / "straight"
    args = ["finetune", "--stage", "2", "--data", str(_manifest(root)), "--output", str(out), "--model", str(tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder), "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "6",
            "--lr", "1e-3", "--save-every", "2", "--keep-checkpoints", "0", "--seed", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out


def _crashed_after_step_3(finished_run: Path, where: Path) -> Path:
    """The run as a crash after step 3 leaves it: checkpoint-2 the newest, steps 1-3 logged."""
    shutil.copytree(finished_run, where)
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(where / name)
    log = where / "train_log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]) + '{"step": 4, "lo')  # torn mid-line
    return where


def _readme_resume_line() -> list[str]:
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "# continue after Ctrl-C or a crash" in line)
    argv = shlex.split(line.split("#")[0])
    assert argv[:2] == ["omni", "finetune"], line
    return argv[1:]


def test_the_readme_resume_line_continues_the_run_with_its_own_settings(finished_run: Path, tmp_path: Path) -> None:
    out = _crashed_after_step_3(finished_run, tmp_path / "runs" / "s2")
    argv = [str(out) if arg == "runs/s2" else arg for arg in _readme_resume_line()]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.stderr
    assert "global batch 2 = 1 process × 2 samples × 1 accumulation step; 6 steps (2 per epoch), resuming after step 2" in result.stderr
    # The same weights as straight through, and every step in the loss log once, the lost ones re-run.
    straight, resumed = saved_tensors(finished_run / "final"), saved_tensors(out / "final")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (finished_run / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference], rel=1e-6)
    assert [row["lr"] for row in rows] == pytest.approx([row["lr"] for row in reference], rel=1e-9)


@pytest.mark.parametrize("flag, value, saved", [
    ("--batch-size", "8", "--batch-size 2"),
    ("--max-steps", "60", "--max-steps 6"),
    ("--epochs", "2", "--epochs 3"),
    ("--lr", "0.5", "--lr 0.001"),
    ("--warmup-ratio", "0.5", "--warmup-ratio 0.03"),
    ("--seed", "5", "--seed 4"),
    ("--stage", "1", "--stage 2"),
], ids=lambda v: v if v.startswith("--") and " " not in v else None)
def test_a_flag_that_contradicts_the_run_is_refused_naming_it(finished_run: Path, tmp_path: Path, flag: str, value: str, saved: str) -> None:
    out = _crashed_after_step_3(finished_run, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    result = CliRunner().invoke(app, ["finetune", "--resume", str(out), flag, value])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert f"{flag} {value} contradicts the run being resumed ({saved} in {out / 'checkpoint-2' / 'run.json'})" in line, line
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_same_values_and_a_smaller_micro_batch_are_accepted(tiny_model, finished_run: Path, tmp_path: Path) -> None:
    out = _crashed_after_step_3(finished_run, tmp_path / "out")
    result = CliRunner().invoke(app, ["finetune", "--resume", str(out), "--stage", "2", "--batch-size", "2", "--lr", "1e-3",
                                      "--micro-batch-size", "1"])
    assert result.exit_code == 0, result.stderr
    assert "global batch 2 = 1 process × 1 samples × 2 accumulation steps" in result.stderr
    base, straight, resumed = saved_tensors(tiny_model.model_dir), saved_tensors(finished_run / "final"), saved_tensors(out / "final")
    for name in straight:  # micro-batches change memory, not the training (see test_global_batch.py)
        assert (resumed[name] - straight[name]).norm() <= 0.01 * (straight[name] - base[name]).norm() + 1e-7, name


def test_a_checkpoint_from_before_run_json_resumes_with_the_settings_in_its_trainer_state(finished_run: Path, tmp_path: Path) -> None:
    out = _crashed_after_step_3(finished_run, tmp_path / "out")
    for point in out.glob("checkpoint-*"):
        (point / "run.json").unlink()
    refused = CliRunner().invoke(app, ["finetune", "--resume", str(out), "--batch-size", "4"])
    assert refused.exit_code == 2
    assert f"(--batch-size 2 in {out / 'checkpoint-2' / 'trainer_state.pt'})" in _one_error_line(refused)
    result = CliRunner().invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "global batch 2 = 1 process × 2 samples × 1 accumulation step; 6 steps (2 per epoch), resuming after step 2" in result.stderr
    for name, tensor in saved_tensors(finished_run / "final").items():
        torch.testing.assert_close(saved_tensors(out / "final")[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_export_only_writes_the_model_of_a_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["finetune", "--resume", str(finished_run / "checkpoint-4"), "--output", str(tmp_path / "at-4"),
                                      "--export-only"])
    assert result.exit_code == 0, result.stderr
    assert "omni: exporting the model of step 4" in result.stderr
    exported, trained = saved_tensors(tmp_path / "at-4" / "final"), saved_tensors(finished_run / "checkpoint-4")
    for name, tensor in trained.items():
        assert torch.equal(exported[name.replace("unit_decoder.", "speech_generator.")], tensor), name
    assert not (tmp_path / "at-4" / "train_log.jsonl").exists()


def _damaged_run_file(root: Path) -> Path:
    point = root / "out" / "checkpoint-3"
    point.mkdir(parents=True)
    (point / "trainer_state.pt").write_bytes(b"")
    (point / "run.json").write_text('{"format": 1, "step": ')
    return point


def _a_model(root: Path) -> Path:
    (root / "final").mkdir()
    (root / "final" / "config.json").write_text("{}")
    return root / "final"


def _an_empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _a_manifest(root: Path) -> Path:
    (root / "train.jsonl").write_text("{}\n")
    return root / "train.jsonl"


# Each refused in one line, exit 2, before torch is imported, within a second.
FAST_REFUSALS = [
    ("resume-missing", lambda root: ["--resume", str(root / "nowhere")], "does not exist"),
    ("resume-a-file", lambda root: ["--resume", str(_a_manifest(root))], "is a file; pass a checkpoint-N folder"),
    ("resume-an-empty-folder", lambda root: ["--resume", str(_an_empty_folder(root))], "no checkpoint to resume under"),
    ("resume-a-model", lambda root: ["--resume", str(_a_model(root))], "is a fine-tuned model, not a resume point"),
    ("resume-damaged-run-json", lambda root: ["--resume", str(_damaged_run_file(root))], "run.json is not readable"),
    ("lr-nan", lambda root: ["--stage", "2", "--data", "m.jsonl", "--output", "o", "--lr", "nan"], "Invalid value for '--lr'"),
    ("lr-negative", lambda root: ["--stage", "2", "--data", "m.jsonl", "--output", "o", "--lr", "-1"], "Invalid value for '--lr'"),
    ("warmup-nan", lambda root: ["--stage", "2", "--data", "m.jsonl", "--output", "o", "--warmup-ratio", "nan"], "Invalid value for '--warmup-ratio'"),
    ("epochs-inf", lambda root: ["--stage", "2", "--data", "m.jsonl", "--output", "o", "--epochs", "inf"], "Invalid value for '--epochs'"),
    ("output-is-the-model", lambda root: ["--stage", "2", "--data", "m.jsonl", "--model", str(_a_model(root)), "--output",
                                          str(root / "final")], "is the model"),
]


@pytest.mark.parametrize("make_args, expected", [case[1:] for case in FAST_REFUSALS], ids=[case[0] for case in FAST_REFUSALS])
def test_bad_resume_and_option_values_are_one_line_within_a_second_without_torch(tmp_path: Path, make_args, expected: str) -> None:
    args = ["finetune", *make_args(tmp_path)]
    code = f"import sys\nfrom omni_cli.cli import app\ntry:\n    app({args!r})\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("omni: error: ") and expected in done.stderr, done.stderr
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
