"""Bad input that needs a live process or a real pipe: Ctrl-C while `omni chat` starts and Ctrl-C
pressed again and again in `transcribe-and-reply` (real SIGINTs), a FIFO nobody writes to and a
process substitution as input, typed bytes that are not UTF-8. Each: one line, the exit status,
no traceback, nothing of the user's lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from process_group import kill_group, run_to_end
from typer.testing import CliRunner

from omni_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _omni(*args: str) -> list[str]:
    return [sys.executable, "-m", "omni_cli.cli", *args]


def test_ctrl_c_while_chat_starts_is_one_line_and_leaves_no_session(tiny_model, tmp_path: Path) -> None:
    # A torch that takes its time to import (as on a cold cache): the Ctrl-C lands while chat is starting.
    marker, shim = tmp_path / "importing-torch", tmp_path / "slow-torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    command = _omni("chat", "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
                    "--text", "--session-dir", str(tmp_path / "s"))
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "torch never imported"  # type: ignore[union-attr]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["omni: interrupted while starting; nothing was saved."]
    assert not (tmp_path / "s").exists()  # nothing that would block the folder's reuse


@pytest.mark.slow  # two real transcribe-and-reply processes with the tiny model (~8 s each on 2 cores)
@pytest.mark.parametrize("gap_s", [0.01, 0.05])
def test_ctrl_c_pressed_three_times_is_one_line_and_no_traceback(tiny_model, question_wavs: list[Path], tmp_path: Path, gap_s: float) -> None:
    command = _omni("transcribe-and-reply", str(question_wavs[0]), "--model", str(tiny_model.model_dir),
                    "--speech-encoder", str(tiny_model.speech_encoder), "--vocoder", str(tiny_model.vocoder_dir),
                    "--out", str(tmp_path / "out"), "--max-new-tokens", "100000", "--context-budget", "200000", "--chunk-units", "1", "--first-chunk-units", "1")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = b""
        while len(seen) < len(f"{question_wavs[0].name}: ") + 12:  # past the file's name: the reply is streaming
            chunk = os.read(proc.stdout.fileno(), 256)  # type: ignore[union-attr]
            assert chunk, proc.stderr.read().decode()  # type: ignore[union-attr]
            seen += chunk
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(gap_s)
        _, stderr_bytes = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    stderr = stderr_bytes.decode()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("omni:")]
    assert len(lines) == 1 and lines[0].startswith("omni: interrupted: "), stderr
    assert all(p.name.endswith(".partial.wav") for p in (tmp_path / "out").iterdir())


def test_a_fifo_nobody_writes_to_is_one_line_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "question.wav"
    os.mkfifo(fifo)
    started = time.monotonic()
    done = run_to_end(_omni("transcribe-and-reply", str(fifo), "--model", str(tmp_path / "model")), timeout=30, cwd=ROOT)
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"omni: error: {fifo}: nothing came through this pipe within 0.5 s (no writer?); give an audio file, or start what writes to the pipe first."
    ]
    assert seconds < 2.0, f"{seconds:.2f} s"  # start-up and the 0.5 s wait


def test_a_pipe_is_read_once_and_answered(tiny_model, question_wavs: list[Path]) -> None:
    # As `omni transcribe-and-reply <(cat q.wav)`: /dev/fd/N of a pipe, which can be read only once.
    read_end, write_end = os.pipe()

    def writer() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(question_wavs[0].read_bytes())

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(app, ["transcribe-and-reply", f"/dev/fd/{read_end}", "--json", "--max-new-tokens", "3",
                                          "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder)])
    finally:
        thread.join(timeout=10)
        os.close(read_end)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["tokens"] == 3 and "error" not in row


@pytest.mark.slow  # two real chat processes with the tiny model (~6 s each on 2 cores)
@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])  # stdin strict UTF-8, and Python's UTF-8 mode (surrogateescape)
def test_typed_bytes_that_are_not_utf8_are_replaced_not_a_traceback(tiny_model, tmp_path: Path, locale: str) -> None:
    env = {**os.environ, "LC_ALL": locale}
    env.pop("PYTHONIOENCODING", None)
    command = _omni("chat", "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
                    "--text", "--session-dir", str(tmp_path / "s"), "--max-new-tokens", "2")
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(b"caf\xe9 or tea?\n", timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr
    rows = [json.loads(line) for line in (tmp_path / "s" / "transcript.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows if row["type"] == "user"] == ["caf\ufffd or tea?"]
