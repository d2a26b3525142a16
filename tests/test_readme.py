"""README's test command and .ci/run must stay the same command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    test_cmd = next(line for line in readme if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} not in .ci/run"


def test_readme_starts_with_the_two_setup_commands() -> None:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    fence = lines.index("```bash")
    assert "omni chat" in lines[fence + 1]
    assert "pytest" in lines[fence + 2]
