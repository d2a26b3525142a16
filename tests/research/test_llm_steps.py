"""The LLM steps' logic as pure functions: prompts, answer checks, retries with the reason, the answer cache.

The round trip against a real OpenAI-compatible server (`omni serve`) is test_llm_round_trip.py; here
the only request made is to a closed port, through the real openai client.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from omni_cli.data.spoken_style import RESPONSE_BOUNDS, SpokenStyleWriter, parse_answer, speech_problem
from omni_cli.llm_endpoint import AnswerCache, ChatEndpoint, EndpointError, Message, RejectedAnswer, ask_until_valid


def scripted(answers: list[str]):
    """A `complete` that answers from a list and records what it was asked."""
    asked: list[list[Message]] = []

    def complete(messages: Sequence[Message]) -> str:
        asked.append(list(messages))
        return answers[len(asked) - 1]

    return complete, asked


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Paris is the capital of France.", None),
        ("Here are tips:\n1. Sleep\n2. Eat", "list"),
        ("- sleep\n- eat well", "list"),
        ("It is **very** important.", "markdown"),
        ("## Answer\nParis", "markdown"),
        ("Use `ls` to list files.", "markdown"),
        ("See https://example.com for more.", "URL"),
        ("Paris (the capital) is big.", "parentheses"),
        ("Yes.", "fewer than 3"),
        ("word " * 151, "more than 150"),
        ("The capital \ufffd\ufffd is Paris.", "not text (U+FFFD)"),  # broken UTF-8 from a model's byte tokens
        ("The capital\x07 is Paris.", "not text (U+0007)"),
        ("The capital is Paris.\nIt is in France.", None),
    ],
)
def test_replies_unfit_for_speech_are_caught(text: str, problem: str | None) -> None:
    found = speech_problem(text, RESPONSE_BOUNDS)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_answers_are_read_from_json_or_plain_text() -> None:
    assert parse_answer('Sure! {"question": "um, what is two plus two?"}', "question") == "um, what is two plus two?"
    assert parse_answer('"What is two plus two?"', "question") == "What is two plus two?"
    assert parse_answer("```json\n{\"response\": \"Four.\"}\n```", "response") == "Four."
    with pytest.raises(RejectedAnswer, match='no "response"'):
        parse_answer('{"answer": "Four."}', "response")


def test_a_rejected_answer_is_asked_again_with_the_reason_and_fails_after_the_attempts() -> None:
    complete, asked = scripted(["1. Paris\n2. Lyon", '{"response": "The capital of France is Paris."}'])
    writer = SpokenStyleWriter(complete, attempts=3)
    assert writer.respond("what's the capital of france") == "The capital of France is Paris."
    assert len(asked) == 2
    retry = asked[1]
    assert retry[:2] == asked[0] and retry[2] == {"role": "assistant", "content": "1. Paris\n2. Lyon"}
    assert "it holds a list" in retry[3]["content"]  # the model is told what was wrong

    complete, asked = scripted(["(a)", "(b)", "(c)", "never asked"])
    with pytest.raises(RejectedAnswer, match=r"brackets.*after 3 attempts") as info:
        ask_until_valid(complete, [{"role": "user", "content": "q"}], _reject, attempts=3)
    assert len(asked) == 3 and info.value.answer == "(c)"  # the last answer goes with the failure


def _reject(answer: str) -> str:
    raise RejectedAnswer("it holds brackets or parentheses")


def test_the_rewrite_prompt_holds_the_instruction_and_a_prompt_file_overrides_it(tmp_path: Path) -> None:
    complete, asked = scripted(['{"question": "so, um, how tall is mount everest?"}'] * 3)
    assert SpokenStyleWriter(complete).rewrite("Height of Mt. Everest?") == "so, um, how tall is mount everest?"
    system, user = asked[0]
    assert system["role"] == "system" and "text-to-speech" in system["content"]  # the task, whatever the server's default
    assert "Height of Mt. Everest?" in user["content"] and "{instruction}" not in user["content"] and "numbers" in user["content"]
    (tmp_path / "rewrite_instruction.txt").write_text("Say it aloud: {instruction}", encoding="utf-8")
    SpokenStyleWriter(complete, prompt_dir=tmp_path).rewrite("Height of Mt. Everest?")
    assert asked[1][1] == {"role": "user", "content": "Say it aloud: Height of Mt. Everest?"}
    (tmp_path / "system.txt").write_text("\n", encoding="utf-8")  # a server whose chat template refuses a system turn
    SpokenStyleWriter(complete, prompt_dir=tmp_path).rewrite("Height of Mt. Everest?")
    assert asked[2] == [{"role": "user", "content": "Say it aloud: Height of Mt. Everest?"}]
    (tmp_path / "write_response.txt").write_text("no placeholder here", encoding="utf-8")
    with pytest.raises(Exception, match=r"write_response.txt has no \{instruction\}"):
        SpokenStyleWriter(complete, prompt_dir=tmp_path)


class CountingEndpoint(ChatEndpoint):
    """The real endpoint's caching, with the network request replaced by a counter (the request itself is the openai client's)."""

    def __init__(self, cache: AnswerCache) -> None:
        super().__init__("http://127.0.0.1:1/v1", "m", cache)
        self.requests = 0

    def _request(self, messages: Sequence[Message]) -> str:
        self.requests += 1
        return json.dumps({"response": f"Answer number {self.requests} is here."})


def test_a_rerun_pays_for_no_answer_twice_even_after_a_torn_cache_line(tmp_path: Path) -> None:
    path = tmp_path / "llm-cache.jsonl"
    first = CountingEndpoint(AnswerCache(path))
    writer = SpokenStyleWriter(first.complete)
    replies = [writer.respond(q) for q in ("one?", "two?", "three?")]
    assert first.requests == 3
    with path.open("a", encoding="utf-8") as f:
        f.write('{"key": "torn by a cra')  # a crash in the middle of a write
    again = CountingEndpoint(AnswerCache(path))
    assert [SpokenStyleWriter(again.complete).respond(q) for q in ("one?", "two?", "three?")] == replies
    assert again.requests == 0 and again.stats.cached == 3
    SpokenStyleWriter(again.complete).respond("four?")
    assert again.requests == 1


def test_an_unreachable_endpoint_is_one_line_through_the_real_client() -> None:
    endpoint = ChatEndpoint("http://127.0.0.1:1/v1", "any-model", timeout_s=5)
    with pytest.raises(EndpointError, match=r"cannot reach the LLM at http://127.0.0.1:1/v1 .*is the server running\?") as info:
        endpoint.complete([{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)
