"""The CUDA suite (tests/gpu) on a machine without CUDA: collected and skipped with the reason,
and its CPU rehearsal (OMNI_TEST_DEVICE=cpu) passing the quick cases and writing their figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_suite(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on tests/gpu in a fresh process with CUDA hidden."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMNI_TEST_DEVICE", "OUT")}
    environ.update(CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=environ)


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """pytest's closing counts: {"passed": n, "skipped": n, ...}."""
    last = proc.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}


@pytest.mark.slow  # a pytest process that imports torch: about 6 s on 2 busy cores
def test_without_cuda_every_gpu_case_is_skipped_with_the_reason() -> None:
    proc = run_gpu_suite("-m", "gpu")
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = summary(proc)
    assert set(counts) == {"skipped"} and counts["skipped"] >= 15, proc.stdout[-2000:]
    assert "no CUDA GPU visible; OMNI_TEST_DEVICE=cpu rehearses this suite on the CPU" in proc.stdout


@pytest.mark.slow  # `omni doctor` and one tiny-model reply in subprocesses: about 40 s on 2 busy cores
def test_cpu_rehearsal_passes_the_quick_cases_and_writes_their_figures(tmp_path: Path) -> None:
    proc = run_gpu_suite("-m", "gpu and not slow", OMNI_TEST_DEVICE="cpu", OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = summary(proc)
    assert counts.get("passed", 0) >= 2 and "failed" not in counts and "errors" not in counts, counts
    rows = {row["case"]: row for row in map(json.loads, (tmp_path / "gpu_suite.jsonl").read_text().splitlines())}
    assert rows["environment"]["rehearsal"] is True
    assert any(line.startswith("MISSING  CUDA GPU") for line in rows["doctor[auto]"]["lines"])
    reply = rows["reply[tiny-fp16]"]
    assert reply["tokens"] > 0 and reply["units"] > 0 and reply["audio_s"] > 0 and reply["peak_rss_gb"] > 0, reply
