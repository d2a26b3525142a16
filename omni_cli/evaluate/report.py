"""What `omni eval` prints: the summary of one run, and two runs side by side (`--compare`).

Rates over many items are corpus rates (total errors over total reference words / characters);
latency, decoding time, judge scores and UTMOS are means over the items that have them. "Text reply
vs manifest" compares the text reply with the reply the manifest holds (the one trained on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from omni_cli.errors import OmniError
from omni_cli.evaluate.metrics import NORMALISER, ErrorCounts, corpus_rates

Row = dict[str, Any]
# (key in the summary, what people read, lower is better)
METRICS = (
    ("asr_wer", "ASR-WER %", True),
    ("asr_cer", "ASR-CER %", True),
    ("ref_wer", "text reply vs manifest, WER %", True),
    ("ref_exact", "text reply = manifest, % items", False),
    ("first_audio_ms", "first audio, ms", True),
    ("decoding_ms", "decoding time, ms", True),
    ("content_text", "S2TIF content (1-5)", False),
    ("style_text", "S2TIF style (1-5)", False),
    ("content_speech", "S2SIF content (1-5)", False),
    ("style_speech", "S2SIF style (1-5)", False),
    ("utmos", "UTMOS (1-5)", False),
)


def _mean(rows: Sequence[Row], key: str) -> float | None:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return round(sum(values) / len(values), 3) if values else None


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """The run's figures: counts, corpus WER/CER, and means of the rest (None where no item has one)."""
    counts = [
        ErrorCounts(r["word_errors"], r["words"], r["char_errors"], r["chars"]) for r in rows if isinstance(r.get("words"), int)
    ]
    wer, cer = corpus_rates(counts)
    with_reference = [r for r in rows if isinstance(r.get("ref_words"), int) and r["ref_words"] > 0]
    reference_words = sum(r["ref_words"] for r in with_reference)
    summary: dict[str, Any] = {
        "items": len(rows),
        "replied": sum(1 for r in rows if "text" in r),
        "failed": sum(1 for r in rows if "error" in r),
        "asr_wer": None if wer is None else round(wer, 2),
        "asr_cer": None if cer is None else round(cer, 2),
        "ref_wer": round(100.0 * sum(r["ref_word_errors"] for r in with_reference) / reference_words, 2) if with_reference else None,
        "ref_exact": round(100.0 * sum(r["ref_word_errors"] == 0 for r in with_reference) / len(with_reference), 2) if with_reference else None,
    }
    for key, _, _ in METRICS:
        if key not in summary:  # the rest are means over the items that have them
            summary[key] = _mean(rows, key)
    summary["normaliser"] = NORMALISER
    return summary


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """The summary as a two-column table."""
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("items (replied / failed)", f"{summary['items']} ({summary['replied']} / {summary['failed']})")
    for key, label, _ in METRICS:
        table.add_row(label, _cell(summary.get(key)))
    return table


# Keys of a training manifest's records, which `omni eval`'s rows never hold: given one, say so.
MANIFEST_KEYS = ("speech", "conversations", "tgt_speech", "tgt_units", "messages")


def load_results(path: Path) -> list[Row]:
    """The rows of an `omni eval` results file (OUT/eval.jsonl); OmniError (one line) for a file that is not one."""
    path = Path(path)
    hint = "give the eval.jsonl that `omni eval` wrote in its --out folder"
    if not path.is_file():
        raise OmniError(f"{path} not found; give two eval.jsonl files written by `omni eval`.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise OmniError(f"{path} is not UTF-8 text, so not an `omni eval` result; {hint}.") from None
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise OmniError(f"{path} line {number} is not a result of `omni eval` (a JSON object with an id); {hint}.")
        found = [k for k in MANIFEST_KEYS if k in row]
        if found:
            raise OmniError(f"{path} is a training manifest (its records hold {found[0]!r}), not an `omni eval` result; {hint}.")
        rows.append(row)
    if not rows:
        raise OmniError(f"{path} holds no results; is it an eval.jsonl written by `omni eval`?")
    return rows


def finished(row: Row) -> bool:
    """Whether the run answered this item (an unfinished row holds only its id, a failed one an error)."""
    return "text" in row


def _change(a: Row, b: Row) -> float:
    """How much one item moved between runs: WER points (ASR and vs the manifest) plus 10 per judge point (a 1-point move is large)."""
    total = 0.0
    for key in ("wer", "ref_wer"):
        if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)):
            total += abs(b[key] - a[key])
    for key in ("content_text", "style_text", "content_speech", "style_speech"):
        if isinstance(a.get(key), int) and isinstance(b.get(key), int):
            total += 10 * abs(b[key] - a[key])
    if a.get("text") != b.get("text"):
        total += 1e-3  # a changed reply with equal scores still ranks above an unchanged one
    return total


# What the items that changed most show of each run.
ITEM_FIELDS = ("ref_wer", "wer", "content_speech", "text")


def compare(a_rows: Sequence[Row], b_rows: Sequence[Row], top: int = 5) -> dict[str, Any]:
    """Both runs' summaries over the items finished in both (replied to; an unfinished or failed item
    would weigh on one side only), and the items that changed most."""
    a_by_id = {r["id"]: r for r in a_rows if finished(r)}
    b_by_id = {r["id"]: r for r in b_rows if finished(r)}
    shared = [i for i in a_by_id if i in b_by_id]
    if not shared:
        raise OmniError(
            "the two runs have no item finished in both; compare runs over the same manifest, each run to its end "
            "(the same `omni eval` command continues one)."
        )
    a_sum = summarize([a_by_id[i] for i in shared])
    b_sum = summarize([b_by_id[i] for i in shared])
    ranked = sorted(shared, key=lambda i: _change(a_by_id[i], b_by_id[i]), reverse=True)
    changed = [
        {
            "id": i,
            "change": round(_change(a_by_id[i], b_by_id[i]), 3),
            **{f"{k}_a": a_by_id[i].get(k) for k in ITEM_FIELDS},
            **{f"{k}_b": b_by_id[i].get(k) for k in ITEM_FIELDS},
        }
        for i in ranked[:top] if _change(a_by_id[i], b_by_id[i]) > 0
    ]
    # only_a / only_b: items finished in one run but not in the other (left out of both summaries).
    return {"shared_items": len(shared), "only_a": len(a_by_id) - len(shared), "only_b": len(b_by_id) - len(shared),
            "unfinished_a": len(a_rows) - len(a_by_id), "unfinished_b": len(b_rows) - len(b_by_id),
            "a": a_sum, "b": b_sum, "changed_most": changed}


def print_comparison(result: dict[str, Any], a_name: str, b_name: str, console: Console) -> None:
    """The comparison as two tables: metrics side by side, then the items that changed most."""
    left_out = result["only_a"] + result["only_b"]
    table = Table(
        title=f"{result['shared_items']} items finished in both runs"
        + (f" ({result['only_a']} more in A, {result['only_b']} more in B, left out)" if left_out else "")
    )
    for column in ("metric", f"A: {a_name}", f"B: {b_name}", "B − A"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label, lower_better in METRICS:
        a, b = result["a"].get(key), result["b"].get(key)
        delta = "—" if a is None or b is None else f"{b - a:+.3g}" + (" better" if (b < a) == lower_better and b != a else "")
        table.add_row(label, _cell(a), _cell(b), delta)
    console.print(table)
    changed = result["changed_most"]
    if changed:
        # Only the measures some item has (no judge: no S2SIF column).
        shown = [(k, label) for k, label in (("ref_wer", "WER vs manifest"), ("wer", "ASR-WER"), ("content_speech", "S2SIF content"))
                 if any(c[f"{k}_a"] is not None or c[f"{k}_b"] is not None for c in changed)]
        items = Table(title="items that changed most")
        for column in ("id", *(f"{label} A → B" for _, label in shown), "reply A", "reply B"):
            items.add_column(column)
        for c in changed:
            items.add_row(
                c["id"], *(f"{_cell(c[f'{k}_a'])} → {_cell(c[f'{k}_b'])}" for k, _ in shown),
                (c["text_a"] or "")[:60], (c["text_b"] or "")[:60],
            )
        console.print(items)


def as_json(value: Any) -> str:
    """One line of JSON for --json."""
    return json.dumps(value, ensure_ascii=False)
