"""`omni eval` on the tiny model through the users' code path: replies, Whisper transcripts, WER/CER, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.evaluate.metrics import error_counts


@pytest.fixture()
def manifest(tmp_path: Path, question_wavs: list[Path]) -> Path:
    """Two spoken questions: one whose text the manifest gives, one the judge would learn from Whisper."""
    path = tmp_path / "eval.jsonl"
    rows = [
        {"id": "q1", "speech": str(question_wavs[0]), "instruction": "What is the capital of France?", "response": "Paris is the capital."},
        {"id": "q2", "speech": str(question_wavs[1])},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _model_args(tiny_model) -> list[str]:
    return ["--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
            "--vocoder", str(tiny_model.vocoder_dir), "--max-new-tokens", "12", "--device", "cpu"]


def test_eval_answers_transcribes_scores_and_continues_without_redoing(manifest: Path, tmp_path: Path, tiny_model) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out), *_model_args(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["items"], summary["replied"], summary["failed"]) == (2, 2, 0)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2"]
    for row in rows:
        assert Path(row["wav"]).parent == out / "replies" and Path(row["wav"]).is_file()
        assert row["text"] and 1 <= row["tokens"] <= 12 and row["units"] > 0
        assert 0 < row["first_audio_ms"] <= row["decoding_ms"]
        assert isinstance(row["transcript"], str) and row["transcript"]  # the tiny Whisper's decoder wrote text
        counts = error_counts(row["text"], row["transcript"])
        if counts is not None:
            assert (row["word_errors"], row["words"], row["wer"]) == (counts.word_errors, counts.words, round(counts.wer, 2))
    assert (rows[0]["instruction"], rows[0]["instruction_from"]) == ("What is the capital of France?", "manifest")
    assert rows[1]["instruction_from"] == "asr"
    counts = error_counts("Paris is the capital.", rows[0]["text"])  # the reply the manifest trains on, against the text reply
    assert (rows[0]["reference"], rows[0]["ref_word_errors"], rows[0]["ref_words"]) == ("Paris is the capital.", counts.word_errors, 4)
    assert "reference" not in rows[1] and "ref_wer" not in rows[1]
    assert summary["ref_wer"] == round(counts.wer, 2)
    assert "UTMOS left out" in result.output  # utmos-pytorch is installed, but its weights cannot be fetched here

    before = (out / "eval.jsonl").read_text()
    wavs = sorted((out / "replies").iterdir())
    again = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out), *_model_args(tiny_model), "--no-mos"])
    assert again.exit_code == 0, again.output
    assert (out / "eval.jsonl").read_text() == before and sorted((out / "replies").iterdir()) == wavs
    assert "ASR-WER %" in again.output


def test_an_existing_reply_file_is_never_replaced(manifest: Path, tmp_path: Path, tiny_model) -> None:
    out = tmp_path / "run"
    (out / "replies").mkdir(parents=True)
    mine = out / "replies" / "helpful_base_1.wav"
    mine.write_bytes(b"my own recording")
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out), *_model_args(tiny_model), "--no-mos", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert mine.read_bytes() == b"my own recording"
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[0])["wav"].endswith("helpful_base_1-2.wav")


def test_a_whisper_that_cannot_transcribe_is_refused_before_any_reply(manifest: Path, tmp_path: Path, tiny_model) -> None:
    no_tokenizer = tmp_path / "whisper-no-tokenizer"
    shutil.copytree(tiny_model.speech_encoder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out), *_model_args(tiny_model), "--asr", str(no_tokenizer)])
    assert result.exit_code == 1 and "--asr: " in result.output and "has no tokenizer" in result.output
    assert not (out / "replies").exists()
    missing = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out)])
    assert missing.exit_code == 2 and "give MANIFEST, --out and --model" in missing.output


def test_a_run_with_another_model_sampling_or_manifest_is_refused_and_an_edited_item_is_redone(
    manifest: Path, tmp_path: Path, tiny_model
) -> None:
    out = tmp_path / "run"
    args = ["eval", str(manifest), "--out", str(out), "--no-mos", "--limit", "1"]
    first = CliRunner().invoke(app, [*args, *_model_args(tiny_model)])
    assert first.exit_code == 0, first.output
    before = (out / "eval.jsonl").read_text()

    other_model = tmp_path / "other-omni"  # the same weights elsewhere: another checkpoint for all omni can tell
    shutil.copytree(tiny_model.model_dir, other_model)
    other_args = _model_args(tiny_model)
    other_args[1] = str(other_model)
    refused = CliRunner().invoke(app, [*args, *other_args])
    assert refused.exit_code == 2, refused.output
    assert "holds results of another run" in refused.output and f"now {other_model.resolve()}" in refused.output
    assert "give a new --out" in refused.output and "Traceback" not in refused.output
    assert (out / "eval.jsonl").read_text() == before  # the base model's rows are not shown as the other's

    sampled = CliRunner().invoke(app, [*args, *_model_args(tiny_model)[:-4], "--max-new-tokens", "5", "--device", "cpu"])
    assert sampled.exit_code == 2 and "sampling" in sampled.output, sampled.output
    elsewhere = tmp_path / "copy.jsonl"
    shutil.copy(manifest, elsewhere)
    moved = CliRunner().invoke(app, ["eval", str(elsewhere), *args[2:], *_model_args(tiny_model)])
    assert moved.exit_code == 2 and "manifest: was" in moved.output, moved.output

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["response"] = "Paris, of course."  # the item changed: its row is made again, not kept
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    redone = CliRunner().invoke(app, [*args, *_model_args(tiny_model)])
    assert redone.exit_code == 0, redone.output
    row = json.loads((out / "eval.jsonl").read_text().splitlines()[0])
    assert row["reference"] == "Paris, of course." and len(list((out / "replies").iterdir())) == 2


@pytest.mark.parametrize("where, message", [("under-a-file", "cannot be created: "), ("proc", "is not writable (")])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_the_model_loads(manifest: Path, tiny_model, where: str, message: str) -> None:
    out = manifest / "sub" if where == "under-a-file" else Path("/proc/omni-test")
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(out), *_model_args(tiny_model), "--no-mos", "--limit", "1"])
    assert result.exit_code == 2 and message in result.output and "choose" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1


def test_each_failed_item_is_named_with_its_reason(tmp_path: Path, question_wavs: list[Path], tiny_model) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "gone", "speech": str(tmp_path / "no-such.wav")}, {"id": "q1", "speech": str(question_wavs[0])}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(tmp_path / "run"), *_model_args(tiny_model), "--no-mos"])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith("failed: gone: ") and "no-such.wav" in failed[0], result.stderr


def test_a_malformed_manifest_line_is_reported_for_evaluating_not_training(tmp_path: Path, question_wavs: list[Path], tiny_model) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "q1", "speech": str(question_wavs[0])}) + "\n{not json\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(tmp_path / "run"), *_model_args(tiny_model)])
    assert result.exit_code == 1 and "fix or remove them before evaluating" in result.output, result.output
    assert "training" not in result.output and "line 2: not valid JSON" in result.output
