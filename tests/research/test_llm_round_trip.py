"""The LLM steps against a real OpenAI-compatible server: `omni serve` on the tiny model, in its own process group.

The tiny model writes gibberish, so nothing here is about content: every answer the server gave is
compared with what the same model says in this process for the same messages (system prompt, the
retry's history, temperature, seed, token limit), and the build's and the judge's outcomes with what
the same checks make of those answers. A rerun is made against a closed port: the cache answers all.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.config import ReplyOptions, SamplingConfig
from omni_cli.data.spoken_style import SpokenStyleWriter
from omni_cli.evaluate.judge import CRITERIA, Judge
from omni_cli.llm_endpoint import ChatEndpoint, EndpointError, Message, RejectedAnswer
from omni_cli.pipeline import Done, HistoryTurn

pytest.importorskip("openai")

CLOSED = "http://127.0.0.1:1/v1"
ITEMS = [
    {"id": "paris", "instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"id": "joke", "instruction": "Tell me a joke."},
]


class InProcess:
    """`complete` answered by the tiny pipeline in this process, as `omni serve` turns messages into a reply."""

    def __init__(self, pipeline, temperature: float, max_tokens: int, seed: int | None) -> None:
        self.pipeline = pipeline
        self.sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        self.answers: list[str] = []

    def __call__(self, messages: Sequence[Message]) -> str:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        history = [HistoryTurn(None, user["content"], reply["content"]) for user, reply in zip(turns[:-1:2], turns[1:-1:2])]
        events = list(self.pipeline.respond(turns[-1]["content"], history, None, ReplyOptions(system=system, sampling=self.sampling, speak=False)))
        assert isinstance(events[-1], Done)
        self.answers.append(events[-1].text)
        return events[-1].text


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def test_data_build_through_omni_serve_checks_retries_records_and_a_rerun_asks_nothing(tiny_server, tiny_pipeline, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    out = tmp_path / "data"
    command = ["data", "build", str(source), "--out", str(out), "--llm-model", "llama-omni", "--attempts", "2", "--seed", "3"]
    result = CliRunner().invoke(app, [*command, "--llm-url", tiny_server.base_url])

    # What the server must have been asked and have answered: the same writer, the model in this process.
    here = InProcess(tiny_pipeline, temperature=0.7, max_tokens=512, seed=3)
    writer = SpokenStyleWriter(here, attempts=2)
    expected: dict[str, tuple[str, str | None]] = {}
    for item in ITEMS:
        try:
            spoken = writer.rewrite(item["instruction"])
            expected[item["id"]] = ("built", spoken if "response" in item else writer.respond(spoken))
        except RejectedAnswer as exc:
            expected[item["id"]] = (str(exc), exc.answer)
    assert len(here.answers) > len(ITEMS), "no answer was rejected and asked again: pick another --seed"

    cache = _rows(out / "llm-cache.jsonl")
    assert [row["answer"] for row in cache] == here.answers  # every request made once, answered as the model answers
    failed = {row["id"]: (row["reason"], row["last_answer"]) for row in _rows(out / "failed.jsonl")}
    assert failed == {k: v for k, v in expected.items() if v[0] != "built"}
    built = {row["id"] for row in _rows(out / "items.jsonl")}
    assert built == {k for k, v in expected.items() if v[0] == "built"}
    assert result.exit_code == (1 if failed else 0), result.output
    for item_id, (reason, _) in failed.items():
        assert f"failed: {item_id}: {reason}" in result.output and "(after 2 attempts)" in reason

    manifest = (out / "train.jsonl").read_bytes()
    again = CliRunner().invoke(app, [*command, "--llm-url", CLOSED])  # nothing left to ask: the server is never needed
    assert again.exit_code == result.exit_code, again.output
    assert "cannot reach" not in again.output
    assert _rows(out / "llm-cache.jsonl") == cache and (out / "train.jsonl").read_bytes() == manifest
    assert {row["id"]: (row["reason"], row["last_answer"]) for row in _rows(out / "failed.jsonl")} == failed


def test_eval_judges_through_omni_serve_and_a_rerun_asks_nothing(tiny_server, tiny_pipeline, tiny_model, question_wavs, tmp_path: Path) -> None:
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text(json.dumps({"id": "q1", "speech": str(question_wavs[0]), "instruction": "What is the capital of France?"}) + "\n")
    out = tmp_path / "run"
    command = [
        "eval", str(manifest), "--out", str(out), "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
        "--vocoder", str(tiny_model.vocoder_dir), "--max-new-tokens", "12", "--device", "cpu", "--no-mos", "--judge-model", "llama-omni",
    ]
    result = CliRunner().invoke(app, [*command, "--judge-url", tiny_server.base_url])
    assert result.exit_code == 0, result.output
    (row,) = _rows(out / "eval.jsonl")

    here = InProcess(tiny_pipeline, temperature=0.0, max_tokens=16, seed=None)
    judge = Judge(here)
    for side, response in (("text", row["text"]), ("speech", row["transcript"])):
        try:
            scores = judge.scores(row["instruction"], response)
        except RejectedAnswer as exc:
            assert row[f"judge_error_{side}"] == str(exc)
            assert all(f"{c}_{side}" not in row for c in CRITERIA)
        else:
            assert {c: row[f"{c}_{side}"] for c in CRITERIA} == scores and all(1 <= s <= 5 for s in scores.values())
    cache = _rows(out / "judge-cache.jsonl")
    assert [r["answer"] for r in cache] == here.answers

    before = (out / "eval.jsonl").read_bytes()
    again = CliRunner().invoke(app, [*command, "--judge-url", CLOSED])
    assert again.exit_code == 0, again.output
    assert _rows(out / "judge-cache.jsonl") == cache and (out / "eval.jsonl").read_bytes() == before
    other_judge = CliRunner().invoke(app, [*command[:-1], "another-judge", "--judge-url", CLOSED])  # its scores must not mix with these
    assert other_judge.exit_code == 2 and "judge: was llama-omni, now another-judge" in other_judge.output, other_judge.output
    assert (out / "eval.jsonl").read_bytes() == before


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A TCP port that takes connections and never answers (a server stuck on a long answer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        listener.close()


def test_an_llm_that_does_not_answer_in_time_is_one_line_naming_the_option(silent_server: str, tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match=r"did not answer within 0.2 s \(3 tries\); a slow model needs a longer --judge-timeout"):
        ChatEndpoint(silent_server, "m", timeout_s=0.2, options="--judge").complete([{"role": "user", "content": "hi"}])
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ITEMS[0]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "build", str(source), "--out", str(tmp_path / "d"), "--llm-url", silent_server,
                                      "--llm-model", "m", "--llm-timeout", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"omni: error: the LLM at {silent_server} did not answer within 1 s (3 tries); a slow model needs a longer --llm-timeout."
    )
