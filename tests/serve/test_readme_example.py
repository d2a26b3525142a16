"""README's `omni serve` SDK example runs as written (only the port differs) against a real `omni serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from servers import omni_serve

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("### `omni serve`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_sdk_example_runs_as_written(tiny_model, question_wavs, tmp_path) -> None:
    code = _example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    shutil.copy(question_wavs[0], tmp_path / "question.wav")
    # Short replies keep the tiny model quick: the server's --max-new-tokens bounds every request.
    with omni_serve(tiny_model, "--max-new-tokens", "12") as server:
        script = code.replace("http://127.0.0.1:8000/v1", server.base_url)
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].endswith(" s of speech") and float(lines[-1].split()[0]) > 0
    reply, rate = sf.read(tmp_path / "reply.wav")
    assert rate == 16000 and len(reply) > 0
