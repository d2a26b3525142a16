"""A newcomer's whole loop through the CLI on the tiny model: 4 spoken questions (espeak-ng), `omni finetune
--stage 1` then `--stage 2`, and the 4 trained answers back from `omni transcribe-and-reply`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edit_distance import edit_distance
from omni_cli.cli import app

# Answers made of words the tiny tokenizer knows; units arbitrary (no HuBERT here), at most
# one per reply token's frames after the first token's.
PAIRS = [
    ("What is the capital of France?", "Paris.", [5, 17, 300, 2, 42]),
    ("How do I bake bread?", "Eat well.", [70, 100, 200, 300]),
    ("Tell me a joke.", "Hello!", [900, 1, 2, 3]),
    ("What is the weather like?", "Sleep enough.", [8, 80, 800, 88]),
]


def _replies(model: Path, wavs: list[Path], *extra: str) -> list[dict]:
    result = CliRunner().invoke(app, ["transcribe-and-reply", *map(str, wavs), "--model", str(model), "--json", *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow  # two short training runs and two replies to 4 questions on the tiny model: ~60-90 s on 2 cores
def test_four_spoken_questions_overfit_through_the_cli(tiny_model, tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (CI installs it with .ci/sound-server.sh)")
    records = []
    for i, (question, answer, units) in enumerate(PAIRS):
        subprocess.run(["espeak-ng", "-w", str(tmp_path / f"q{i}.wav"), question], check=True, capture_output=True)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": answer, "tgt_units": units})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    wavs = [tmp_path / f"q{i}.wav" for i in range(len(PAIRS))]
    answers = [answer for _, answer, _ in PAIRS]
    common = ["--data", str(manifest), "--batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0", "--save-every", "0"]

    stage1 = CliRunner().invoke(app, ["finetune", "--stage", "1", *common, "--max-steps", "60", "--output", str(tmp_path / "s1"),
                                      "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder)])
    assert stage1.exit_code == 0, stage1.output
    assert [r["text"] for r in _replies(tmp_path / "s1" / "final", wavs)] == answers

    stage2 = CliRunner().invoke(app, ["finetune", "--stage", "2", *common, "--max-steps", "120", "--output", str(tmp_path / "s2"),
                                      "--model", str(tmp_path / "s1" / "final")])
    assert stage2.exit_code == 0, stage2.output
    rows = _replies(tmp_path / "s2" / "final", wavs, "--vocoder", str(tiny_model.vocoder_dir))
    assert [r["text"] for r in rows] == answers
    distances = [edit_distance(r["units"], units) for r, (_, _, units) in zip(rows, PAIRS)]
    # [0, 1, 0, 0] here; untrained, each is about its target's length. A CTC local minimum may drop a unit (test_trainer.py).
    assert sum(distances) <= 2, distances
