"""LLM-judge scores as InstructS2S-Eval: content and style, 1 to 5, of a reply to a spoken instruction.

The paper had GPT-4o rate the text reply (S2TIF) and the Whisper transcript of the speech reply (S2SIF)
for content (relevant, accurate, concise) and style (fit to be heard: short, no lists or symbols).
The two prompts are `prompts/judge_content.txt` and `prompts/judge_style.txt`, with `{instruction}` and
`{response}` filled in, sent after the system prompt `prompts/judge_system.txt` (an empty file sends
none); a file of the same name in `--judge-prompts DIR` replaces one. An answer
that holds no score from 1 to 5 is asked again with the reason; answers are cached like the data
builder's (any OpenAI-compatible endpoint, `--judge-url` / `--judge-model`).
"""

from __future__ import annotations

import re
from pathlib import Path

from omni_cli.llm_endpoint import Complete, RejectedAnswer, ask_until_valid, check_prompt, conversation, fill, load_prompt

CRITERIA = ("content", "style")
SYSTEM_PROMPT = "judge_system.txt"
_SCORE = re.compile(r"(?<![\d.])([1-5])(?:\.0)?(?!\d|\.\d)")


def parse_score(answer: str) -> int:
    """The 1–5 score in a judge's answer ("4", "Score: 4", "4/5"); RejectedAnswer when there is none or several differ."""
    found = {int(m) for m in _SCORE.findall(answer.split("/")[0] if "/" in answer else answer)}
    if not found:
        raise RejectedAnswer("it holds no score from 1 to 5; answer with one digit")
    if len(found) > 1:
        raise RejectedAnswer(f"it holds several scores ({', '.join(map(str, sorted(found)))}); answer with one digit")
    return found.pop()


class Judge:
    """Content and style scores of replies, through `complete` (a cached endpoint)."""

    def __init__(self, complete: Complete, prompt_dir: Path | None = None, attempts: int = 3) -> None:
        self.complete = complete
        self.attempts = attempts
        self.system = load_prompt("omni_cli.evaluate", SYSTEM_PROMPT, prompt_dir)
        self.templates = {c: load_prompt("omni_cli.evaluate", f"judge_{c}.txt", prompt_dir) for c in CRITERIA}
        for criterion, template in self.templates.items():
            check_prompt(template, f"judge_{criterion}.txt", ("{instruction}", "{response}"))

    def score(self, criterion: str, instruction: str, response: str) -> int:
        """One criterion's score of `response` to `instruction` (RejectedAnswer after `attempts` unusable answers)."""
        prompt = fill(self.templates[criterion], instruction=instruction, response=response)
        return ask_until_valid(self.complete, conversation(self.system, prompt), parse_score, self.attempts)

    def scores(self, instruction: str, response: str) -> dict[str, int]:
        """Both criteria: {"content": n, "style": n}."""
        return {c: self.score(c, instruction, response) for c in CRITERIA}
