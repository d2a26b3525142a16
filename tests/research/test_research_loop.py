"""The paper's research loop end to end, offline, through the CLI on the tiny models with espeak-ng:
text JSONL → `omni data build` (units from the tiny mHuBERT + k-means) → `omni finetune --stage 1` →
`--stage 2` → `omni eval` before and after → `omni eval --compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.tiny.hubert import make_tiny_units

# Replies made of words the tiny tokenizer knows (tiny/omni.py), so a few steps can learn them.
QUESTIONS = [
    {"id": "capital", "instruction": "What is the capital of France?", "response": "Paris."},
    {"id": "joke", "instruction": "Tell me a joke.", "response": "Hello!"},
]


def _omni(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})  # rich's tables unwrapped
    assert result.exit_code == 0, result.output
    return result.output


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # data for 2 items, 25 + 10 training steps, two evaluations: 14 s on 2 cores at load 1, 27-65 s at load 4.5
def test_text_to_an_evaluated_fine_tune_through_the_cli(tiny_model, tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (CI installs it with .ci/sound-server.sh)")
    units = make_tiny_units(tmp_path / "tiny-units")
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    data = tmp_path / "data"
    built = _omni("data", "build", source, "--out", data, "--hubert", units.hubert_dir, "--kmeans", units.kmeans, "--layer", units.layer)
    assert "2 of 2 items" in built and "unit targets: 2 of 2 items" in built
    manifest = data / "train.jsonl"

    train = ["--data", manifest, "--batch-size", "2", "--lr", "3e-3", "--warmup-ratio", "0", "--save-every", "0"]
    _omni("finetune", "--stage", "1", *train, "--max-steps", "25", "--output", tmp_path / "s1",
          "--model", tiny_model.model_dir, "--speech-encoder", tiny_model.speech_encoder)
    _omni("finetune", "--stage", "2", *train, "--max-steps", "10", "--output", tmp_path / "s2", "--model", tmp_path / "s1" / "final")
    stage2 = _losses(tmp_path / "s2")
    assert stage2[-1] < stage2[0] / 2, stage2  # the speech decoder learned the units (46 → 11 here)

    model = ["--speech-encoder", tiny_model.speech_encoder, "--vocoder", tiny_model.vocoder_dir, "--device", "cpu", "--no-mos", "--json"]
    before = json.loads(_omni("eval", manifest, "--out", tmp_path / "base", "--model", tiny_model.model_dir, *model).splitlines()[-1])
    after = json.loads(_omni("eval", manifest, "--out", tmp_path / "tuned", "--model", tmp_path / "s2" / "final", *model).splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "eval.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [q["response"] for q in QUESTIONS]  # the trained replies, from their spoken questions
    assert (before["ref_exact"], after["ref_exact"], after["ref_wer"]) == (0.0, 100.0, 0.0) and before["ref_wer"] > 0
    for summary in (before, after):  # the speech replies were made, transcribed and scored
        assert summary["replied"] == 2 and summary["asr_wer"] is not None and summary["asr_cer"] is not None
    assert all(Path(r["wav"]).is_file() and r["units"] > 0 for r in rows)

    runs = (tmp_path / "base" / "eval.jsonl", tmp_path / "tuned" / "eval.jsonl")
    compared = _omni("eval", "--compare", *runs)
    line = next((x for x in compared.splitlines() if "text reply = manifest" in x), compared)
    assert "+100 better" in line, compared
    assert json.loads(_omni("eval", "--compare", *runs, "--json"))["b"] == after
    assert "items that changed most" in compared and "Paris." in compared and "Hello!" in compared
