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
    rows = _run("latency.py", "--max-new-tokens", "30", "--chunk-units", "10", "--warmup", "0", "--decode-steps", "eager", "static",
                "--units-per-token", "4")
    assert [r["decode_steps"] for r in rows] == ["eager", "static"]
    for row in rows:
        for key in ("features_ms", "encoder_ms", "adaptor_ms", "prefill_ms", "llm_step_ms", "unit_step_ms", "vocoder_chunk_ms",
                    "first_audio_ms", "ref_first_audio_ms", "rtf", "unit_decoding_speedup"):
            assert row[key] is not None and row[key] > 0, key
        assert row["chunk_units"] == 10 and row["tokens"] == 30
        # 30 tokens of at most 25 frames (one unit each) per token.
        assert 0 < row["units"] <= 30 * 25 and row["audio_s"] > 0
        # The whole reply cannot be faster than the time to its first audio, which comes after
        # the stages before generation: one reply through respond(), timed from its events.
        assert row["reply_s"] * 1000 >= row["first_audio_ms"]
        assert row["first_audio_ms"] >= row["features_ms"] + row["encoder_ms"] + row["adaptor_ms"] + row["prefill_ms"]
        assert row["llm_steps_until_first_chunk"] > 1 and row["first_audio_ratio_ref_over_ours"] > 0
        # The 30 s padding priced: a ~2 s question needs a fraction of the 300 speech positions.
        assert row["speech_positions"] == 300 and 0 < row["unpadded_speech_positions"] < 60
        assert row["unpadded_encoder_ms"] > 0 and row["unpadded_prefill_ms"] > 0
        # 1 unit from the first token, 9 more at 4 per token: 3 more steps.
        assert row["projected_llm_steps_until_first_chunk"] == 4
    # Same weights, same question: both step modes produce the same units.
    assert rows[0]["units_sha1"] == rows[1]["units_sha1"]


def test_unit_decoding_benchmark_compares_both_ways() -> None:
    rows = _run("unit_decoding.py", "--lengths", "10,20", "--threads", "1")
    results = rows[0]["results"]
    assert [r["tokens"] for r in results] == [10, 20]
    assert all(r["units_agree"] for r in results)


def test_memory_benchmark_measures_loaded_weights_and_a_spoken_reply() -> None:
    rows = _run("memory.py", "--size", "tiny", "--precision", "fp32", "--device", "cpu", "--max-new-tokens", "8")
    assert len(rows) == 1
    row = rows[0]
    assert (row["size"], row["precision"], row["device"] != "") == ("tiny", "fp32", True)
    # All fp32: the loaded modules' bytes equal weights.fit's count from the config files × 4 bytes.
    assert row["param_bytes"] > 0
    assert row["param_bytes"] == row["estimate_weight_bytes"]
    # The full estimate adds caches and workspace; this run's KV length is below the 4096-token chat budget.
    assert row["estimate_gb"] >= row["estimate_this_reply_gb"] > row["estimate_weights_gb"]
    assert row["reply_tokens"] == 8 and row["reply_units"] > 0
    # Every unit lasts at least one 20 ms vocoder frame.
    assert row["reply_audio_s"] >= 0.02 * row["reply_units"]


def test_memory_benchmark_refuses_4bit_on_cpu_before_writing_anything(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--size", "full", "--precision", "4bit",
         "--device", "cpu", "--workdir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "4bit" in lines[0] and "CUDA" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # failed before writing the 18 GB checkpoint
