"""Reading text instruction data in the formats the field publishes: JSONL, Alpaca, ShareGPT, UltraChat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_cli.data.sources import SourceError, read_text_items


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_format_gives_the_first_instruction_and_its_reply(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    ]), encoding="utf-8")
    items, skipped = read_text_items(alpaca)
    assert [(i.instruction, i.response) for i in items] == [
        ("Give three tips for staying healthy.", "Eat well, sleep, move."),
        ("Translate to French.\n\nGood morning", "Bonjour"),  # Alpaca's input follows its instruction
    ]
    assert not skipped

    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [{"id": "s1", "conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "Hi, who are you?"},
        {"from": "gpt", "value": "An assistant."}, {"from": "human", "value": "second turn, ignored"}]}])
    ultrachat_hf = _jsonl(tmp_path / "ultra.jsonl", [{"prompt_id": "u1", "messages": [
        {"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Water falling."}]}])
    ultrachat_raw = _jsonl(tmp_path / "ultra_raw.jsonl", [{"id": 7, "data": ["Why is the sky blue?", "Scattering.", "More?"]}])
    plain = _jsonl(tmp_path / "plain.jsonl", [{"instruction": "Say hi."}])
    got = {p.name: read_text_items(p)[0][0] for p in (sharegpt, ultrachat_hf, ultrachat_raw, plain)}
    assert (got["sharegpt.jsonl"].id, got["sharegpt.jsonl"].instruction, got["sharegpt.jsonl"].response) == ("s1", "Hi, who are you?", "An assistant.")
    assert (got["ultra.jsonl"].id, got["ultra.jsonl"].instruction, got["ultra.jsonl"].response) == ("u1", "What is rain?", "Water falling.")
    assert (got["ultra_raw.jsonl"].id, got["ultra_raw.jsonl"].response) == ("7", "Scattering.")
    assert (got["plain.jsonl"].id, got["plain.jsonl"].response) == ("item-000001", None)


def test_ids_are_safe_file_names_and_unique_and_bad_records_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"id": "../etc/passwd", "instruction": "a"}) + "\n"
        + json.dumps({"id": "../etc/passwd", "instruction": "b"}) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "   "}) + "\n"
        + json.dumps({"text": "no known field"}) + "\n",
        encoding="utf-8",
    )
    items, skipped = read_text_items(path)
    assert [i.id for i in items] == ["etc_passwd", "etc_passwd-2"]
    assert items[0].source_id == "../etc/passwd"
    assert [s.where for s in skipped] == ["line 3", "record 4", "record 5"]
    assert "not valid JSON" in skipped[0].reason and "empty" in skipped[1].reason and "no 'instruction'" in skipped[2].reason


def test_a_file_without_any_instruction_is_one_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(SourceError, match="holds no usable instruction"):
        read_text_items(path)
    with pytest.raises(SourceError, match="not found"):
        read_text_items(tmp_path / "missing.jsonl")
