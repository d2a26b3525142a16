"""An OpenAI-compatible chat endpoint (ollama, vLLM, llama.cpp's server, `omni serve`, a hosted API) with an answer cache.

`omni data build` asks it to rewrite instructions and write spoken-style replies, `omni eval` to
judge replies. Every answer is kept in a JSONL cache keyed by what was asked (model, messages,
sampling), so a rerun after Ctrl-C or a crash pays for nothing twice. `ask_until_valid` is the
retry loop: an answer that fails its check is sent back once more with the reason, a bounded
number of times. The `openai` package (the field's client) is imported only when a request is made.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omni_cli.errors import OmniError, one_line
from omni_cli.jsonl_files import append_row, read_rows

T = TypeVar("T")
Message = dict[str, str]
Complete = Callable[[Sequence[Message]], str]
# Where the key comes from: a variable of omni's own first, then the one every OpenAI client reads.
KEY_VARIABLES = ("OMNI_LLM_API_KEY", "OPENAI_API_KEY")
RETRIES = 2  # the openai client's own: after a dropped connection, a timeout, 429 or 5xx


class EndpointError(OmniError):
    """The endpoint could not be reached or refused the request."""


class RejectedAnswer(ValueError):
    """An answer that fails its check; the message says why, for the retry and the failure report.

    `answer` is the answer itself once `ask_until_valid` gives up (kept with the failure, so a person
    can see what the model wrote).
    """

    def __init__(self, reason: str, answer: str | None = None) -> None:
        super().__init__(reason)
        self.answer = answer


def cache_key(model: str, messages: Sequence[Message], temperature: float, max_tokens: int, seed: int | None = None) -> str:
    """What identifies one question: the model, the exact messages and the sampling settings."""
    settings = {"model": model, "messages": list(messages), "temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers kept in a JSONL file, one `{"key", "answer"}` a line, appended and flushed as they come.

    A line torn by a crash is skipped when the file is read back (that one answer is asked again).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.answers = {k: row["answer"] for k, row in read_rows(self.path, key="key").items() if isinstance(row.get("answer"), str)}

    def get(self, key: str) -> str | None:
        """The kept answer, or None."""
        return self.answers.get(key)

    def put(self, key: str, answer: str) -> None:
        """Keep an answer (on disk at once: a crash right after loses nothing)."""
        self.answers[key] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_row(self.path, {"key": key, "answer": answer})


@dataclass
class EndpointStats:
    """How many answers were asked for and how many of them came from the cache."""

    asked: int = 0
    cached: int = 0


class ChatEndpoint:
    """Chat completions at `url` (an OpenAI-compatible base URL such as http://127.0.0.1:11434/v1) for `model`.

    The key is read from the environment (KEY_VARIABLES); local servers accept any. `seed` goes with
    every request (vLLM, llama.cpp, ollama and `omni serve` honour it), so a sampled answer can be
    made again. `options` is how the command's options begin (--llm, --judge): errors name the one to change.
    """

    def __init__(
        self, url: str, model: str, cache: AnswerCache | None = None, *, temperature: float = 0.0,
        max_tokens: int = 512, seed: int | None = None, timeout_s: float = 120.0, options: str = "--llm",
        key_variables: Sequence[str] = KEY_VARIABLES,
    ) -> None:
        self.url = url
        self.model = model
        self.cache = cache
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.timeout_s = timeout_s
        self.options = options
        self.key = next((os.environ[v] for v in key_variables if os.environ.get(v)), None)
        self.key_variables = tuple(key_variables)
        self.stats = EndpointStats()
        self._client: Any = None

    def _openai(self) -> Any:
        if self._client is None:
            try:
                from openai import OpenAI
            except ImportError as exc:
                raise EndpointError("the LLM steps need the openai package: pip install 'omni-cli[research]'.") from exc
            # Local servers take any key; the client refuses to start without one.
            self._client = OpenAI(base_url=self.url, api_key=self.key or "none", timeout=self.timeout_s, max_retries=RETRIES)
        return self._client

    def complete(self, messages: Sequence[Message]) -> str:
        """The assistant's answer to `messages` (from the cache when it was asked before)."""
        key = cache_key(self.model, messages, self.temperature, self.max_tokens, self.seed)
        self.stats.asked += 1
        if self.cache is not None and (kept := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return kept
        answer = self._request(messages)
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def _request(self, messages: Sequence[Message]) -> str:
        import openai

        client = self._openai()
        sampling: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            sampling["seed"] = self.seed
        try:
            response = client.chat.completions.create(model=self.model, messages=list(messages), **sampling)
        except openai.APITimeoutError as exc:
            raise EndpointError(
                f"the LLM at {self.url} did not answer within {self.timeout_s:g} s ({RETRIES + 1} tries); "
                f"a slow model needs a longer {self.options}-timeout."
            ) from exc
        except openai.AuthenticationError as exc:
            raise EndpointError(
                f"{self.url} refused the key ({one_line(exc)}); set {' or '.join(self.key_variables)} to a valid key."
            ) from exc
        except openai.NotFoundError as exc:
            raise EndpointError(f"{self.url} has no model {self.model!r} ({one_line(exc)}); check {self.options}-model.") from exc
        except openai.APIConnectionError as exc:
            raise EndpointError(f"cannot reach the LLM at {self.url} ({one_line(exc)}); is the server running?") from exc
        except openai.APIError as exc:
            raise EndpointError(f"the LLM at {self.url} failed: {one_line(exc)}") from exc
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        if not isinstance(content, str):
            raise EndpointError(f"the LLM at {self.url} sent no text in its answer; check that {self.model!r} is a chat model.")
        return content


def ask_until_valid(
    complete: Complete, messages: Sequence[Message], parse: Callable[[str], T], attempts: int = 3
) -> T:
    """Ask, check the answer with `parse` (RejectedAnswer: not usable), and ask again with the reason.

    Each retry appends the rejected answer and a user turn saying what was wrong, so the retry is a
    different question (a cached or greedy endpoint would otherwise repeat itself) and every
    attempt is cached on its own. Raises RejectedAnswer with the last reason after `attempts`.
    """
    asked = list(messages)
    reason, answer = "no attempt made", ""
    for _ in range(max(1, attempts)):
        answer = complete(asked)
        try:
            return parse(answer)
        except RejectedAnswer as exc:
            reason = str(exc)
        asked = [
            *asked,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"That answer cannot be used: {reason}. Answer again, following every rule above."},
        ]
    raise RejectedAnswer(f"{reason} (after {max(1, attempts)} attempts)", answer)


# Prompts: text files in a package's prompts/ folder, each replaceable by a file of the same name.


def load_prompt(package: str, name: str, override_dir: Path | None = None) -> str:
    """A prompt template: `override_dir/name` when that file exists, else the package's `prompts/name`."""
    if override_dir is not None and (Path(override_dir) / name).is_file():
        text = (Path(override_dir) / name).read_text(encoding="utf-8")
    else:
        text = (resources.files(package) / "prompts" / name).read_text(encoding="utf-8")
    return text


def check_prompt(template: str, name: str, placeholders: tuple[str, ...]) -> None:
    """Refuse a template that lacks a placeholder it must fill (a prompt that never shows the text)."""
    missing = [p for p in placeholders if p not in template]
    if missing:
        raise OmniError(f"prompt {name} has no {' or '.join(missing)}; the text to work on goes there.")


def conversation(system: str, user: str) -> list[Message]:
    """The messages of one question: the system prompt (left out when blank: some chat templates refuse one), then the user's."""
    system_turn = [{"role": "system", "content": system.strip()}] if system.strip() else []
    return [*system_turn, {"role": "user", "content": user}]


def fill(template: str, **values: str) -> str:
    """The template with each `{name}` replaced (plain replacement: the JSON braces in a prompt stay as written)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template
