"""The benchmark scripts run end to end and print one JSON line per configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_latency_benchmark_reports_breakdown_and_reference_ratio() -> None:
    rows = _run("latency.py", "--max-new-tokens", "30", "--chunk-units", "10", "--warmup", "0", "--llm-steps", "eager", "static")
    assert [r["llm_steps"] for r in rows] == ["eager", "static"]
    for row in rows:
        for key in ("features_ms", "encoder_ms", "adaptor_ms", "prefill_ms", "llm_step_ms", "unit_step_ms", "vocoder_chunk_ms",
                    "first_audio_ms", "ref_first_audio_ms", "rtf", "unit_decoding_speedup"):
            assert row[key] is not None and row[key] > 0, key
        assert row["chunk_units"] == 10 and row["tokens"] == 30
        # 30 tokens of at most 25 frames (one unit each) per token.
        assert 0 < row["units"] <= 30 * 25 and row["audio_s"] > 0
        # The whole reply cannot be faster than the time to its first audio.
        assert row["reply_s"] * 1000 >= row["first_audio_ms"]
    # Same weights, same question: both step modes produce the same units.
    assert rows[0]["units"] == rows[1]["units"]


def test_unit_decoding_benchmark_compares_both_ways() -> None:
    rows = _run("unit_decoding.py", "--lengths", "10,20", "--threads", "1")
    results = rows[0]["results"]
    assert [r["tokens"] for r in results] == [10, 20]
    assert all(r["units_agree"] for r in results)
