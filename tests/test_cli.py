"""The command line itself: importing it stays light, and a mistyped option is one line, before anything loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app


def test_importing_the_cli_does_not_import_torch() -> None:
    # `omni --help` and option errors must not wait for torch (seconds on a cold cache).
    code = "import sys, omni_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'numpy', 'fastapi', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["chat", "-m", "x", "--precision", "3bit"], "omni: error: Invalid value for '--precision': '3bit' is not one of 'auto', 'fp32', 'fp16', 'bf16', '8bit', '4bit'; see `omni chat --help`."),
        (["chat", "--bogus"], "omni: error: No such option: --bogus; see `omni chat --help`."),
        (["chat"], "omni: error: Missing option '--model' / '-m'; see `omni chat --help`."),
        (["finetune", "--stage", "1", "--data", "d", "--output", "o", "--precision", "4bit"],
         "omni: error: Invalid value for '--precision': '4bit' is not one of 'auto', 'fp32', 'bf16', 'fp16'; see `omni finetune --help`."),
        (["nosuch"], "omni: error: No such command 'nosuch'; see `omni --help`."),
    ],
)
def test_a_mistyped_command_line_is_one_line(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == expected
    assert result.stdout == ""


def test_defaults_shown_in_help_come_from_the_run_settings() -> None:
    from omni_cli.config import ChatOptions, SamplingConfig, StreamingConfig

    text = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "250"}).stdout
    for option, value in (("--max-new-tokens", SamplingConfig.max_new_tokens), ("--chunk-units", StreamingConfig.chunk_units),
                          ("--hangover-ms", ChatOptions.hangover_ms), ("--context-budget", StreamingConfig.context_budget)):
        line = next(line for line in text.splitlines() if option in line)
        assert f"[default: {value}]" in line, line
