"""ASR-WER/CER against hand-counted examples, the judge's score parsing and prompts, and `omni eval --compare`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.evaluate.judge import Judge, parse_score
from omni_cli.evaluate.metrics import ErrorCounts, corpus_rates, error_counts, normalise
from omni_cli.evaluate.report import compare, summarize
from omni_cli.llm_endpoint import RejectedAnswer


def test_the_normaliser_lowers_drops_punctuation_and_keeps_numbers_as_written() -> None:
    assert normalise("Don't STOP\u2014now!  Really?") == "dont stop now really"
    assert normalise("It costs 42%, (roughly).") == "it costs 42 roughly"
    assert normalise("Forty-two") == "forty two"
    assert normalise("ＡＢＣ") == "abc"  # NFKC: full-width letters are letters


def test_wer_and_cer_match_hand_counts() -> None:
    # the cat sat on the mat (6 words) vs the cat sit on mat: sat→sit substituted, one "the" deleted = 2 errors.
    # Characters (22, spaces count): a→i substituted, "the " deleted (4) = 5 errors.
    counts = error_counts("The cat sat on the mat.", "the cat sit on mat")
    assert counts == ErrorCounts(word_errors=2, words=6, char_errors=5, chars=22)
    assert counts.wer == pytest.approx(100 * 2 / 6) and counts.cer == pytest.approx(100 * 5 / 22)
    # Numbers as written: "42" vs "forty two" is one substitution and one insertion over 3 words.
    assert error_counts("I am 42.", "I am forty-two").word_errors == 2
    assert error_counts("Hello, world!", "hello world").wer == 0.0
    assert error_counts("two words", "").wer == 100.0  # nothing heard: every word deleted
    assert error_counts("  ...  ", "anything") is None  # no reference to score against


def test_corpus_rates_are_total_errors_over_total_words_not_a_mean_of_rates() -> None:
    a = error_counts("the cat sat on the mat", "the cat sit on mat")  # 2 of 6
    b = error_counts("one two three", "one two three")  # 0 of 3
    wer, cer = corpus_rates([a, b])
    assert wer == pytest.approx(100 * 2 / 9) and cer == pytest.approx(100 * 5 / (22 + 13))


@pytest.mark.parametrize(("answer", "score"), [("4", 4), ("Score: 5", 5), ("4/5", 4), ("3.0", 3), ("I'd give it 2.", 2)])
def test_judge_scores_are_read_from_the_answer(answer: str, score: int) -> None:
    assert parse_score(answer) == score


@pytest.mark.parametrize("answer", ["ten", "10", "between 3 and 4", "0", "6"])
def test_answers_without_one_score_are_rejected(answer: str) -> None:
    with pytest.raises(RejectedAnswer):
        parse_score(answer)


def test_the_judge_asks_content_and_style_with_the_papers_criteria_and_retries(tmp_path: Path) -> None:
    asked: list[list[dict]] = []
    answers = iter(["Great answer!", "4", "2"])

    def complete(messages: Sequence[dict]) -> str:
        asked.append(list(messages))
        return next(answers)

    scores = Judge(complete).scores("what is the capital of france", "It is Paris.")
    assert scores == {"content": 4, "style": 2}
    assert "no score from 1 to 5" in asked[1][-1]["content"]  # the retry says why
    assert asked[0][0]["role"] == "system" and "judge" in asked[0][0]["content"]
    content, style = asked[0][-1]["content"], asked[2][-1]["content"]
    for prompt in (content, style):
        assert "what is the capital of france" in prompt and "It is Paris." in prompt and "{response}" not in prompt
    assert "CONTENT" in content and "relevant" in content and "STYLE" in style and "lists" in style
    (tmp_path / "judge_style.txt").write_text("Rate {response} to {instruction}", encoding="utf-8")
    judge = Judge(lambda m: "5", tmp_path)
    assert judge.templates["style"] == "Rate {response} to {instruction}" and "CONTENT" in judge.templates["content"]


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(item_id: str, wer_errors: int, content: int, text: str) -> dict:
    return {"id": item_id, "text": text, "wer": 100 * wer_errors / 4, "word_errors": wer_errors, "words": 4,
            "char_errors": wer_errors * 3, "chars": 20, "first_audio_ms": 200.0, "decoding_ms": 900.0, "content_speech": content}


def test_compare_shows_both_runs_and_the_items_that_changed_most(tmp_path: Path) -> None:
    a = _rows(tmp_path / "a.jsonl", [_row("q1", 2, 2, "um"), _row("q2", 0, 4, "fine"), _row("q3", 1, 3, "ok")])
    b = _rows(tmp_path / "b.jsonl", [_row("q1", 0, 5, "Paris."), _row("q2", 0, 4, "fine"), _row("q3", 1, 3, "okay"), _row("q4", 0, 5, "new")])
    result = compare([json.loads(x) for x in a.read_text().splitlines()], [json.loads(x) for x in b.read_text().splitlines()])
    assert result["shared_items"] == 3 and result["only_b"] == 1
    assert result["a"]["asr_wer"] == pytest.approx(100 * 3 / 12, abs=0.01) and result["b"]["asr_wer"] == pytest.approx(100 * 1 / 12, abs=0.01)
    assert [c["id"] for c in result["changed_most"]] == ["q1", "q3"]  # q2 did not change at all
    assert (result["changed_most"][0]["text_a"], result["changed_most"][0]["text_b"]) == ("um", "Paris.")

    shown = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "ASR-WER %" in shown.output and "items that changed most" in shown.output and "Paris." in shown.output
    as_json = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b), "--json"])
    assert json.loads(as_json.stdout)["changed_most"][0]["id"] == "q1"
    missing = CliRunner().invoke(app, ["eval", "--compare", str(a), str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "nope.jsonl not found" in missing.output


def test_summary_counts_failures_and_leaves_out_what_no_item_has() -> None:
    summary = summarize([_row("q1", 1, 4, "x"), {"id": "q2", "error": "the model failed"}])
    assert (summary["items"], summary["replied"], summary["failed"]) == (2, 1, 1)
    assert summary["asr_wer"] == 25.0 and summary["utmos"] is None and "numbers as written" in summary["normaliser"]
    assert summary["ref_wer"] is None and summary["ref_exact"] is None  # the manifest held no replies


def test_the_text_reply_against_the_manifest_s_reply_is_a_corpus_rate_and_a_share_of_exact_matches() -> None:
    rows = [
        {"id": "q1", "text": "Paris.", "ref_word_errors": 0, "ref_words": 1},  # "paris" = "paris"
        {"id": "q2", "text": "Eat bread.", "ref_word_errors": 1, "ref_words": 2},  # "eat well": one substitution
        {"id": "q3", "text": "Hello", "ref_word_errors": 0, "ref_words": 1},
        {"id": "q4", "text": "no reply in the manifest"},
    ]
    summary = summarize(rows)
    assert summary["ref_wer"] == 25.0  # 1 error over 4 words, not the mean of 0, 50 and 0
    assert summary["ref_exact"] == pytest.approx(66.67)  # 2 of the 3 items that have a manifest reply
    counts = error_counts("Eat well.", "Eat bread.")
    assert (counts.word_errors, counts.words) == (1, 2)


def test_compare_counts_only_items_finished_in_both_runs(tmp_path: Path) -> None:
    a = _rows(tmp_path / "a.jsonl", [_row(f"q{i}", 1, 3, "ok") for i in range(30)])
    # B stopped after 5 items: the other 25 are unfinished rows (only their id), one more failed.
    b = _rows(tmp_path / "b.jsonl", [_row(f"q{i}", 0, 5, "fine") for i in range(5)] + [{"id": "q5", "error": "no audio"}]
              + [{"id": f"q{i}"} for i in range(6, 30)])
    shown = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "5 items finished in both runs (25 more in A, 0 more in B, left out)" in shown.output
    result = json.loads(CliRunner().invoke(app, ["eval", "--compare", str(a), str(b), "--json"]).stdout)
    assert (result["shared_items"], result["a"]["items"], result["b"]["items"], result["unfinished_b"]) == (5, 5, 5, 25)
    assert result["a"]["asr_wer"] == 25.0 and result["b"]["asr_wer"] == 0.0  # the same 5 items on both sides


def test_compare_refuses_a_file_that_is_not_an_eval_result(tmp_path: Path) -> None:
    a = _rows(tmp_path / "a.jsonl", [_row("q1", 1, 3, "ok")])
    manifest = _rows(tmp_path / "train.jsonl", [{"id": "q1", "speech": "q1.wav", "conversations": []}])
    binary = tmp_path / "noise.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    unfinished = _rows(tmp_path / "u.jsonl", [{"id": "q1"}])
    for other, message in [(manifest, "is a training manifest"), (binary, "is not UTF-8 text"),
                           (unfinished, "no item finished in both")]:
        result = CliRunner().invoke(app, ["eval", "--compare", str(a), str(other)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
