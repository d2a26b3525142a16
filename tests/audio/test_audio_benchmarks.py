"""The audio benchmarks run end to end, print one JSON line per configuration, and still show what they measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # ~5 s: 18 s of audio through the canceller
def test_echo_cancellation_benchmark() -> None:
    rows = _run("echo_cancellation.py", "--delays", "80", "--seconds", "6", "--echo-db", "-6")
    assert [(r["signal"], r["echo_db"]) for r in rows] == [("white_noise", -6.0), ("speech", -6.0)]
    for row in rows:
        assert row["erle_db_by_time"]["5s-"] >= 30.0 and 0 < row["cpu_ms_per_10ms"] < 10
    assert all(r["double_talk_user_level_db"] > -6.0 for r in rows if r["signal"] == "speech")


@pytest.mark.slow  # ~8 s: noise, quiet speech and paused questions through two endpointers
def test_turn_taking_benchmark_shows_noise_rejected_and_no_cut_offs() -> None:
    before, after = _run("turn_taking.py", "--hangover-ms", "500", "--quick")
    assert not before["speech_model"] and before["hangover_ms"] == 600 and before["false_starts_total"] > 0
    assert after["speech_model"] and after["hangover_ms"] == 500
    assert after["false_starts_total"] == 0 and after["noise_sent_s"] == 0 and after["quiet_missed"] == 0
    assert after["pause_cutoffs"] == 0 and after["paused_cases"] == after["questions"]  # --quick: one variant each
    assert after["end_delay_ms_median"] < before["end_delay_ms_median"]
    assert abs(after["voiced_end_error_ms_median"]) <= 60
