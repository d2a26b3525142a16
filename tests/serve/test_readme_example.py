"""README's `omni serve` SDK examples run as written (only the port differs) against a real `omni serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from servers import omni_serve

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("### `omni serve`") :]
    section = section[: section.index("\n### ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def server(tiny_model):
    # Short replies keep the tiny model quick: the server's --max-new-tokens bounds every request.
    with omni_serve(tiny_model, "--max-new-tokens", "12") as running:
        yield running


def _run(example: str, server, question_wavs, folder: Path) -> list[str]:
    assert 'base_url="http://127.0.0.1:8000/v1"' in example
    shutil.copy(question_wavs[0], folder / "question.wav")
    script = example.replace("http://127.0.0.1:8000/v1", server.base_url)
    result = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_readme_chat_completions_example_runs_as_written(server, question_wavs, tmp_path) -> None:
    (example,) = [e for e in _examples() if "chat.completions" in e]
    lines = _run(example, server, question_wavs, tmp_path)
    assert lines[-1].endswith(" s of speech") and float(lines[-1].split()[0]) > 0
    reply, rate = sf.read(tmp_path / "reply.wav")
    assert rate == 16000 and len(reply) > 0


def test_the_readme_realtime_example_runs_as_written(server, question_wavs, tmp_path) -> None:
    (example,) = [e for e in _examples() if "realtime.connect" in e]
    lines = _run(example, server, question_wavs, tmp_path)
    status, seconds = lines[-1].split(": ")
    # The tiny model's replies run to the server's 12 tokens: "incomplete", with half a second of speech.
    assert status == "incomplete" and seconds.endswith(" s of speech") and float(seconds.split()[0]) > 0
    assert lines[0].strip()  # the reply's text came first
    reply, rate = sf.read(tmp_path / "reply-realtime.wav")
    assert rate == 24000 and len(reply) > 0.2 * rate
