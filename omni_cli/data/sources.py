"""Text instruction data in the formats the field publishes it, read into one shape: id, instruction, optional response.

- JSONL (or a JSON list) of `{"instruction", "response"?}` — omni's own, the simplest to write by hand;
- Alpaca: a JSON list of `{"instruction", "input", "output"}` (a non-empty `input` is appended to the
  instruction, as Alpaca's own prompt does);
- ShareGPT: `{"conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}`;
- UltraChat: `{"messages": [{"role": "user", "content"}, ...]}` (the Hugging Face release) or
  `{"data": [question, answer, ...]}` (the original one).
Only the first user turn and the reply that follows it are used, as the paper built InstructS2S-200K.
A record that holds no instruction is reported with its reason; the others are still read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_cli.errors import OmniError

USER_ROLES = ("human", "user")
REPLY_ROLES = ("gpt", "assistant", "chatgpt", "bing", "bard")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_CHARS = 80


class SourceError(OmniError):
    """The input file cannot be read as instruction data at all."""


@dataclass(frozen=True)
class TextItem:
    """One instruction (and the reply written for it, when the data has one), under an id safe as a file name."""

    id: str
    instruction: str
    response: str | None = None
    source_id: str | None = None  # the id the input gave it, when that was not safe as a file name


@dataclass(frozen=True)
class SkippedRecord:
    """A record of the input that holds nothing usable, and why."""

    where: str
    reason: str


def _records(path: Path) -> list[Any]:
    if not path.is_file():
        raise SourceError(f"{path} not found; give a JSONL, Alpaca JSON, ShareGPT or UltraChat file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text (offset {exc.start}); save it as UTF-8 JSON or JSONL.") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path} is not valid JSON ({exc}); fix the file.") from None
        return list(data)
    records: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == 1 and stripped.startswith("{") and "\n" in stripped.strip():
                raise SourceError(f"{path} holds one JSON object, not a list or JSONL of records; write one record per line.") from None
            records.append(SkippedRecord(f"line {number}", f"not valid JSON ({exc.msg})"))
    return records


def _turn_text(turn: Any) -> tuple[str | None, str | None]:
    """(speaker, text) of a ShareGPT or chat-format turn."""
    if not isinstance(turn, dict):
        return None, None
    speaker = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    return (str(speaker).lower() if speaker is not None else None), (text if isinstance(text, str) else None)


def _first_exchange(turns: list[Any]) -> tuple[str | None, str | None]:
    """The first user turn's text and the reply right after it (None when there is none)."""
    for i, turn in enumerate(turns):
        speaker, text = _turn_text(turn)
        if speaker in USER_ROLES:
            reply = None
            if i + 1 < len(turns):
                next_speaker, next_text = _turn_text(turns[i + 1])
                reply = next_text if next_speaker in REPLY_ROLES else None
            return text, reply
    return None, None


def parse_record(record: Any) -> tuple[str | None, str | None, str]:
    """(instruction, response, why not) of one input record, whichever format it is in."""
    if not isinstance(record, dict):
        return None, None, "not a JSON object"
    if isinstance(record.get("instruction"), str):
        instruction = record["instruction"]
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            instruction = f"{instruction.rstrip()}\n\n{extra.strip()}"
        response = record.get("response", record.get("output"))
        return instruction, response if isinstance(response, str) else None, ""
    for field in ("conversations", "messages"):
        if isinstance(record.get(field), list):
            instruction, response = _first_exchange(record[field])
            return instruction, response, "" if instruction is not None else f"no user turn in '{field}'"
    data = record.get("data")
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return data[0], data[1] if len(data) > 1 else None, ""
    return None, None, "no 'instruction', 'conversations', 'messages' or 'data' field"


def safe_id(value: str) -> str:
    """`value` made safe as a file name: runs of other characters become '_', at most MAX_ID_CHARS."""
    cleaned = _UNSAFE.sub("_", value).strip("._")[:MAX_ID_CHARS]
    return cleaned or "item"


def read_text_items(path: str | Path) -> tuple[list[TextItem], list[SkippedRecord]]:
    """Every usable instruction of the file, in order, with unique safe ids, and the records skipped (with reasons)."""
    path = Path(path)
    items: list[TextItem] = []
    skipped: list[SkippedRecord] = []
    seen: set[str] = set()
    for index, record in enumerate(_records(path)):
        if isinstance(record, SkippedRecord):
            skipped.append(record)
            continue
        where = f"record {index + 1}"
        instruction, response, problem = parse_record(record)
        if instruction is None or not instruction.strip():
            skipped.append(SkippedRecord(where, problem or "the instruction is empty"))
            continue
        given = record.get("id", record.get("prompt_id")) if isinstance(record, dict) else None
        base = safe_id(str(given)) if given is not None else f"item-{index + 1:06d}"
        item_id, n = base, 2
        while item_id in seen:  # two records with one id (or ids that clean up alike) stay apart
            item_id, n = f"{base}-{n}", n + 1
        seen.add(item_id)
        source_id = str(given) if given is not None and str(given) != item_id else None
        clean_response = response.strip() if isinstance(response, str) and response.strip() else None
        items.append(TextItem(item_id, instruction.strip(), clean_response, source_id))
    if not items:
        reasons = "; ".join(f"{s.where}: {s.reason}" for s in skipped[:3]) or "the file is empty"
        raise SourceError(f"{path} holds no usable instruction ({reasons}).")
    return items, skipped
