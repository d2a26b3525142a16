"""JSONL files that survive a crash: rows appended and pushed to disk, files rewritten atomically, torn lines skipped.

`omni data build` keeps its journal and `omni eval` its results this way, so Ctrl-C, a crash or a
full disk never leaves a half-written file where a reader (or a rerun) expects a whole one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_rows(path: Path, key: str = "id") -> dict[str, dict[str, Any]]:
    """Rows by `key` (a later line for the same key replaces an earlier one; a line torn by a crash is skipped)."""
    rows: dict[str, dict[str, Any]] = {}
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get(key), str):
                rows[row[key]] = row
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and push it to the disk before going on (it is what a crash must not lose)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_rows_atomically(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` as JSONL to a temporary file and rename it over `path`: readers see the old file or the new one."""
    _write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json_atomically(path: Path, value: Any) -> None:
    """Write one JSON document the same way: readers see the old file or the new one, never half of it."""
    _write_atomically(path, json.dumps(value, ensure_ascii=False, indent=1) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
