"""The LLM steps of `omni data build`: instructions rewritten for speech, replies written to be spoken.

The prompts (in the paper's spirit: fillers allowed, numbers as words, brief; replies without lists,
parentheses or markdown) are text files in the package, `prompts/rewrite_instruction.txt` and
`prompts/write_response.txt`, sent after the system prompt `prompts/system.txt` (which sets the task
whatever the server's own default system prompt is; an empty file sends none); a file of the same
name in `--prompts DIR` replaces one. `{instruction}` in a prompt is replaced by the text. Answers
are asked for as JSON (`{"question": ...}`, `{"response": ...}`), but a plain-text answer is taken
too, since small local models often ignore the form. Each answer is checked (readable characters only, no markdown or lists, length within
bounds) and asked again with the reason when it fails (`ask_until_valid`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omni_cli.llm_endpoint import Complete, RejectedAnswer, ask_until_valid, check_prompt, conversation, fill, load_prompt

SYSTEM_PROMPT = "system.txt"
REWRITE_PROMPT = "rewrite_instruction.txt"
RESPONSE_PROMPT = "write_response.txt"
PLACEHOLDER = "{instruction}"

# What a text-to-speech voice cannot read, or reads as noise.
_MARKDOWN = re.compile(r"(\*\*|__|`|^#{1,6}\s|^\s*>|\[[^\]]*\]\([^)]*\)|\|.*\|)", re.MULTILINE)
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_URL = re.compile(r"https?://|www\.", re.IGNORECASE)
_BRACKETS = re.compile(r"[()\[\]{}<>]")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
# Unicode categories that are not text a voice reads: control characters, unassigned, private use, surrogates.
_NOT_TEXT = {"Cc", "Cn", "Co", "Cs"}
_LAYOUT = {"\n", "\t", "\r"}


def unreadable_character(text: str) -> str | None:
    """The first character of `text` that is not readable text (a control byte, U+FFFD from broken UTF-8), as U+XXXX; or None."""
    for ch in text:
        if ch == "\ufffd" or (unicodedata.category(ch) in _NOT_TEXT and ch not in _LAYOUT):
            return f"U+{ord(ch):04X}"
    return None


def parse_answer(answer: str, field: str) -> str:
    """The text of an answer: `field` of the JSON object it holds, else the answer itself, quotes and fences trimmed."""
    text = answer.strip()
    match = _JSON_OBJECT.search(text)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            value = data.get(field)
            if not isinstance(value, str):
                raise RejectedAnswer(f'the JSON answer has no "{field}" text')
            return value.strip()
    text = re.sub(r"^```\w*\s*|\s*```$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


@dataclass(frozen=True)
class LengthBounds:
    """How long a spoken text may be, in words."""

    min_words: int
    max_words: int


INSTRUCTION_BOUNDS = LengthBounds(1, 80)
RESPONSE_BOUNDS = LengthBounds(3, 150)


def speech_problem(text: str, bounds: LengthBounds) -> str | None:
    """Why `text` is not fit to be spoken (not text, markdown, a list, a URL, brackets, too short or long), or None."""
    if not text.strip():
        return "it is empty"
    if bad := unreadable_character(text):
        return f"it holds characters that are not text ({bad}); write plain words"
    if _MARKDOWN.search(text):
        return "it holds markdown"
    if _LIST_LINE.search(text):
        return "it holds a list"
    if _URL.search(text):
        return "it holds a URL"
    if _BRACKETS.search(text):
        return "it holds brackets or parentheses"
    words = len(text.split())
    if words < bounds.min_words:
        return f"it has {words} words, fewer than {bounds.min_words}"
    if words > bounds.max_words:
        return f"it has {words} words, more than {bounds.max_words}"
    return None


def checked(field: str, bounds: LengthBounds) -> Callable[[str], str]:
    """A parser for `ask_until_valid`: the answer's text, or RejectedAnswer saying why it cannot be spoken."""

    def parse(answer: str) -> str:
        text = parse_answer(answer, field)
        problem = speech_problem(text, bounds)
        if problem:
            raise RejectedAnswer(problem)
        return " ".join(text.split())

    return parse


class SpokenStyleWriter:
    """Rewrites instructions for speech and writes spoken-style replies through `complete` (an endpoint, cached)."""

    def __init__(
        self, complete: Complete, prompt_dir: Path | None = None, attempts: int = 3,
        instruction_bounds: LengthBounds = INSTRUCTION_BOUNDS, response_bounds: LengthBounds = RESPONSE_BOUNDS,
    ) -> None:
        self.complete = complete
        self.attempts = attempts
        self.system = load_prompt("omni_cli.data", SYSTEM_PROMPT, prompt_dir)
        self.rewrite_template = load_prompt("omni_cli.data", REWRITE_PROMPT, prompt_dir)
        self.response_template = load_prompt("omni_cli.data", RESPONSE_PROMPT, prompt_dir)
        check_prompt(self.rewrite_template, REWRITE_PROMPT, (PLACEHOLDER,))
        check_prompt(self.response_template, RESPONSE_PROMPT, (PLACEHOLDER,))
        self.instruction_bounds = instruction_bounds
        self.response_bounds = response_bounds

    def rewrite(self, instruction: str) -> str:
        """The instruction as a user would say it (RejectedAnswer after `attempts` unusable answers)."""
        messages = conversation(self.system, fill(self.rewrite_template, instruction=instruction))
        return ask_until_valid(self.complete, messages, checked("question", self.instruction_bounds), self.attempts)

    def respond(self, instruction: str) -> str:
        """A reply to the (spoken) instruction, written to be spoken (RejectedAnswer after `attempts`)."""
        messages = conversation(self.system, fill(self.response_template, instruction=instruction))
        return ask_until_valid(self.complete, messages, checked("response", self.response_bounds), self.attempts)
