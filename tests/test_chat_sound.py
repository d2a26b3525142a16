"""`omni chat` end to end: a real process, the tiny model, and a private PulseAudio server.

A question WAV is played into the virtual microphone; the speaker's monitor is recorded. The
recording is mapped onto time.monotonic() (the clock the chat process writes into its
transcript; CLOCK_MONOTONIC is shared by all processes), so what was heard can be compared
with what chat says it did. Skipped with the reason where no sound server can start.

Exit status: Ctrl-C (SIGINT) is how a person ends a chat, so it is a clean end: exit code 0,
transcript closed with an "end" record (not 130, which would mean "killed by Ctrl-C").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.sound

RATE = 16000
WINDOW_S = 0.010
LOUD = 0.01  # RMS per 10 ms; the tiny model's reply never drops below ~0.03, the silent sink is 0


def rows_of(session_dir: Path) -> list[dict]:
    path = session_dir / "transcript.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ChatProcess:
    """`python -m omni_cli.cli chat ...` as a child process using the test's sound server."""

    def __init__(self, sound_server, tiny_model, session_dir: Path, *extra: str) -> None:
        self.session_dir = session_dir
        self.log = session_dir.parent / f"{session_dir.name}.log"
        env = {
            **os.environ,
            **sound_server.env,
            "HF_HUB_OFFLINE": "1",
            # 2 CPU cores shared with the sound server and recorders: one torch thread avoids spin-waits.
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "120",
        }
        command = [
            sys.executable, "-m", "omni_cli.cli", "chat",
            "--model", str(tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder),
            "--vocoder", str(tiny_model.vocoder_dir),
            "--precision", "fp32", "--device", "cpu",
            "--session-dir", str(session_dir),
            "--first-chunk-units", "5", "--chunk-units", "20", "--hangover-ms", "450",
            *extra,
        ]  # fmt: skip
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in finish()
        self.process = subprocess.Popen(command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, found: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
        """Poll the transcript until `found(rows)`; fail with chat's output if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = rows_of(self.session_dir)
            if found(rows):
                return rows
            if self.process.poll() is not None:
                pytest.fail(f"omni chat exited ({self.process.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.02)
        pytest.fail(f"no {what} within {timeout} s; transcript {rows_of(self.session_dir)}\n{self.output()}")

    def interrupt(self, timeout: float = 20.0) -> int:
        """Ctrl-C, as a person ends the session; returns the exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"omni chat did not exit within {timeout} s of Ctrl-C:\n{self.output()}")
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


class Recording:
    """The output sink's monitor recorded to a WAV, with sample 0 placed on time.monotonic()."""

    def __init__(self, sound_server, path: Path) -> None:
        self.server, self.path = sound_server, path
        self.process = sound_server.record_output(path, rate=RATE)
        self._ready_t, self._ready_size = time.monotonic(), path.stat().st_size
        self.audio = np.zeros(0, np.float32)
        self.t0 = 0.0

    def stop(self) -> None:
        self.server.stop_recording(self.process)
        self.audio, rate = sf.read(self.path, dtype="float32")
        assert rate == RATE
        header = self.path.stat().st_size - self.audio.size * 4
        self.t0 = self._ready_t - (self._ready_size - header) / 4 / RATE

    def envelope(self) -> np.ndarray:
        size = int(RATE * WINDOW_S)
        n = self.audio.size // size
        return np.sqrt(np.mean(np.square(self.audio[: n * size].reshape(n, size)), axis=1))

    def loud_times(self) -> np.ndarray:
        """Monotonic start time of every 10 ms window holding sound."""
        return self.t0 + np.flatnonzero(self.envelope() > LOUD) * WINDOW_S

    def window(self, start: float, end: float) -> np.ndarray:
        env = self.envelope()
        a, b = (max(0, int(round((t - self.t0) / WINDOW_S))) for t in (start, end))
        return env[a:b]


def report(capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None], **figures: float) -> None:
    for name, value in figures.items():
        record_property(name, round(value, 1))
    with capsys.disabled():
        print("\n  " + ", ".join(f"{name} = {value:.0f} ms" for name, value in figures.items()))


def test_chat_answers_a_spoken_question_aloud(sound_server, tiny_model, question_wavs, tmp_path: Path, capsys, record_property) -> None:
    recording = Recording(sound_server, tmp_path / "speaker.wav")
    chat = ChatProcess(sound_server, tiny_model, tmp_path / "session", "--max-new-tokens", "60")
    try:
        rows = chat.wait_for("listening", lambda r: any(x["type"] == "listening" for x in r), timeout=90)
        assert rows[0]["type"] == "session" and rows[0]["mode"] == "voice" and rows[0]["barge_in"] is False
        question = sound_server.play_into_mic(question_wavs[0])
        assert question.wait(15) == 0
        question_end = time.monotonic()
        rows = chat.wait_for("the reply", lambda r: any(x["type"] == "assistant" for x in r), timeout=60)
        code = chat.interrupt()
    finally:
        chat.kill()
        recording.stop()
    assert code == 0, chat.output()

    rows = rows_of(tmp_path / "session")
    assert [r["type"] for r in rows] == ["session", "listening", "user", "assistant", "end"]
    user, reply, end = rows[2], rows[3], rows[4]
    assert end["reason"] == "ctrl-c" and end["turns"] == 1
    heard, _ = sf.read(tmp_path / "session" / user["wav"], dtype="float32")
    assert 1.5 < heard.size / RATE < 4.5  # the question (2-2.5 s) with pre-roll and hangover
    assert reply["stopped"] == "eos" or reply["tokens"] == 60
    assert reply["text"] and reply["units"] > 0 and (tmp_path / "session" / reply["wav"]).exists()
    assert reply["latency_ms"] > 0

    # The reply was heard on the speaker, after the question ended and not before the endpoint.
    loud = recording.loud_times()
    assert loud.size, f"nothing was played:\n{chat.output()}"
    first_sound = float(loud[0])
    assert first_sound > question_end - 0.1
    assert first_sound > user["end_t"] - 0.05
    heard_s = loud.size * WINDOW_S
    assert heard_s > 0.8 * reply["audio_seconds"] - 0.3, (heard_s, reply["audio_seconds"])
    report(
        capsys,
        record_property,
        endpoint_to_first_audio_handed_ms=reply["latency_ms"],
        endpoint_to_first_sound_recorded_ms=(first_sound - user["end_t"]) * 1000,
        question_end_to_first_sound_ms=(first_sound - question_end) * 1000,
    )


def test_speaking_over_the_reply_stops_it_within_200_ms(sound_server, tiny_model, question_wavs, tmp_path: Path, capsys, record_property) -> None:
    recording = Recording(sound_server, tmp_path / "speaker.wav")
    chat = ChatProcess(sound_server, tiny_model, tmp_path / "session", "--barge-in", "--max-new-tokens", "400")
    try:
        chat.wait_for("listening", lambda r: any(x["type"] == "listening" for x in r), timeout=90)
        first = sound_server.play_into_mic(question_wavs[0])
        assert first.wait(15) == 0
        rows = chat.wait_for("the first turn", lambda r: any(x["type"] == "user" for x in r), timeout=30)
        # The reply (400 tokens: ~20 s of sound) is playing a second or so later; talk over it.
        time.sleep(1.5)
        second = sound_server.play_into_mic(question_wavs[1])
        rows = chat.wait_for("barge-in", lambda r: any(x["type"] == "barge_in" for x in r), timeout=20)
        assert second.wait(15) == 0
        rows = chat.wait_for("the second turn", lambda r: sum(x["type"] == "user" for x in r) == 2, timeout=20)
        code = chat.interrupt()
    finally:
        chat.kill()
        recording.stop()
    assert code == 0, chat.output()

    rows = rows_of(tmp_path / "session")
    kinds = [r["type"] for r in rows]
    assert kinds[:6] == ["session", "listening", "user", "barge_in", "assistant", "user"], kinds
    barge, first_reply, second_user = rows[3], rows[4], rows[5]
    assert first_reply["stopped"] == "interrupted" and first_reply["barge_in_t"] == barge["detected_t"]
    assert barge["stop_ms"] < 200
    heard, _ = sf.read(tmp_path / "session" / second_user["wav"], dtype="float32")
    assert heard.size / RATE > 1.5  # the interrupting question was heard whole, as the next turn
    assert rows[-1]["type"] == "end" and rows[-1]["reason"] == "ctrl-c"

    detected = barge["detected_t"]
    loud = recording.loud_times()
    assert recording.window(detected - 0.4, detected - 0.1).min() > LOUD, "the reply was not playing when the user spoke"
    # Until the second reply can start (after the second question's endpoint), the speaker is silent.
    quiet_until = min(second_user["end_t"], detected + 1.5)
    after = loud[(loud > detected) & (loud < quiet_until)]
    heard_until = float(after.max()) + WINDOW_S if after.size else detected
    assert recording.window(detected + 0.2, quiet_until).size > 50
    assert recording.window(detected + 0.2, quiet_until).max() < LOUD, "playback went on after the barge-in"
    audible_stop_ms = (heard_until - detected) * 1000
    assert audible_stop_ms < 200
    report(
        capsys,
        record_property,
        barge_in_detected_to_player_stopped_ms=barge["stop_ms"],
        barge_in_detected_to_silence_on_speaker_ms=audible_stop_ms,
    )


def test_devices_lists_the_sound_servers_devices(sound_server) -> None:
    env = {**os.environ, **sound_server.env, "COLUMNS": "150"}
    done = subprocess.run([sys.executable, "-m", "omni_cli.cli", "devices"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    default_row = next(line for line in done.stdout.splitlines() if "input, output" in line)
    assert "default" in default_row and " Hz" in default_row
