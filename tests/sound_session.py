"""`omni chat` as a user hears it: a chat process on a private PulseAudio server, and recordings to judge it by.

Shared by tests/test_chat_sound.py and benchmarks/heard_latency.py (which puts tests/ on sys.path).

- `ChatProcess`: `python -m omni_cli.cli chat ...` on the server (optionally from another source
  tree, e.g. an older commit exported with `git archive`), its transcript read as it is written.
- `Recording`: a sink's monitor recorded to a WAV with sample 0 placed on time.monotonic()
  (CLOCK_MONOTONIC is shared by all processes, so it compares with the transcript's `*_t`).
- `heard_turns()`: from the recordings of the microphone and the speaker, per question: the true
  end of speech, the first reply sample out of the speaker, and the gaps inside the reply.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
WINDOW_S = 0.010
LOUD = 0.01  # RMS per 10 ms; the tiny model's reply never drops below ~0.03, a silent null sink is exactly 0
SPEECH_FLOOR = 0.02  # the end of speech: the last sample above this fraction of the utterance's peak (as signals.true_bounds)


class ChatFailed(AssertionError):
    """The chat process exited or did not do what was awaited in time; the message holds its output."""


def rows_of(session_dir: Path) -> list[dict]:
    """The transcript lines written so far."""
    path = session_dir / "transcript.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ChatProcess:
    """`python -m omni_cli.cli chat ...` (a user's defaults, then `extra` options) as a child process using the given sound server.

    `source`: a source tree to run instead of the installed omni_cli (put first on PYTHONPATH).
    `threads`: OMP_NUM_THREADS for it (None: torch's own choice).
    """

    def __init__(self, sound_server, tiny_model, session_dir: Path, *extra: str, source: Path | None = None, threads: int | None = 1) -> None:
        self.session_dir = session_dir
        self.log = session_dir.parent / f"{session_dir.name}.log"
        env = {**os.environ, **sound_server.env, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONFAULTHANDLER": "1"}
        env.pop("OMP_NUM_THREADS", None)
        if threads is not None:
            # 2 CPU cores shared with the sound server and recorders: one torch thread avoids spin-waits.
            env["OMP_NUM_THREADS"] = str(threads)
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
        command = [
            sys.executable, "-m", "omni_cli.cli", "chat",
            "--model", str(tiny_model.model_dir),
            "--speech-encoder", str(tiny_model.speech_encoder),
            "--vocoder", str(tiny_model.vocoder_dir),
            "--precision", "fp32", "--device", "cpu",
            "--session-dir", str(session_dir),
            *extra,
        ]  # fmt: skip
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in interrupt()/kill()
        self.process = subprocess.Popen(
            command, env=env, cwd=source, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rows(self) -> list[dict]:
        return rows_of(self.session_dir)

    def wait_for(self, what: str, found: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
        """Poll the transcript until `found(rows)`; ChatFailed with chat's output if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if found(rows):
                return rows
            if self.process.poll() is not None:
                raise ChatFailed(f"omni chat exited ({self.process.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.02)
        raise ChatFailed(f"no {what} within {timeout} s; transcript {self.rows()}\n{self.output()}")

    def wait_listening(self, timeout: float = 90) -> list[dict]:
        return self.wait_for("listening", lambda r: any(x["type"] == "listening" for x in r), timeout)

    def count(self, kind: str) -> int:
        return sum(row["type"] == kind for row in self.rows())

    def interrupt(self, timeout: float = 20.0) -> int:
        """Ctrl-C, as a person ends the session; returns the exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise ChatFailed(f"omni chat did not exit within {timeout} s of Ctrl-C:\n{self.output()}") from None
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


class Recording:
    """A sink's monitor (default: the speaker's) recorded to a WAV, with sample 0 placed on time.monotonic()."""

    def __init__(self, sound_server, path: Path, sink: str | None = None) -> None:
        self.server, self.path = sound_server, path
        self.process = sound_server.record_output(path, rate=RATE, **({} if sink is None else {"sink": sink}))
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

    def index(self, t: float) -> int:
        return max(0, int(round((t - self.t0) * RATE)))

    def time(self, index: int) -> float:
        return self.t0 + index / RATE


def utterances(recording: Recording, min_silence_s: float = 0.8) -> list[tuple[float, float]]:
    """(start, end) monotonic times of each stretch of sound separated by at least `min_silence_s` of silence.

    The end is the true end of speech: the last sample above SPEECH_FLOOR of the stretch's peak.
    """
    loud = np.flatnonzero(recording.envelope() > LOUD)
    if not loud.size:
        return []
    gap = int(min_silence_s / WINDOW_S)
    breaks = np.flatnonzero(np.diff(loud) > gap)
    spans = []
    for first, last in zip(np.r_[loud[0], loud[breaks + 1]], np.r_[loud[breaks], loud[-1]], strict=True):
        a, b = int(first * RATE * WINDOW_S), int((last + 1) * RATE * WINDOW_S)
        floor = SPEECH_FLOOR * np.abs(recording.audio[a:b]).max()
        # A soft ending (a breath, a fricative) can be quieter than LOUD: look on into the silence.
        tail = np.abs(recording.audio[a : b + int(min_silence_s * RATE / 2)])
        above = np.flatnonzero(tail > floor)
        spans.append((recording.time(a + int(above[0])), recording.time(a + int(above[-1]) + 1)))
    return spans


def first_sound_after(recording: Recording, t: float, level: float = 0.003) -> float | None:
    """The monotonic time of the first sample louder than `level` after `t` (None if there is none)."""
    start = recording.index(t)
    loud = np.flatnonzero(np.abs(recording.audio[start:]) > level)
    return None if not loud.size else recording.time(start + int(loud[0]))


def gaps_within(recording: Recording, start: float, end: float, level: float = 0.003) -> list[float]:
    """Lengths (s) of the silences (no sample louder than `level`) between sounds within [start, end]."""
    a, b = recording.index(start), recording.index(end)
    loud = np.flatnonzero(np.abs(recording.audio[a:b]) > level)
    if loud.size < 2:
        return []
    holes = np.diff(loud) - 1
    return [float(h) / RATE for h in holes[holes > 0]]


@dataclass(frozen=True)
class HeardTurn:
    """One question and its reply as heard: times are time.monotonic() seconds."""

    speech_end: float  # the true end of the question, found in the microphone's recording
    first_sound: float | None  # the first reply sample on the speaker after it
    reply_end: float | None  # the last reply sample before the next question (or the end)
    longest_gap_s: float  # inside the reply, after its first sound
    gaps_over_50ms: int

    @property
    def latency_ms(self) -> float | None:
        return None if self.first_sound is None else (self.first_sound - self.speech_end) * 1000


def heard_turns(mic: Recording, speaker: Recording, min_silence_s: float = 0.8) -> list[HeardTurn]:
    """Each question heard on the microphone (sound parted by at least `min_silence_s`) with its reply as the speaker played it."""
    questions = utterances(mic, min_silence_s)
    turns = []
    for k, (_, end) in enumerate(questions):
        until = questions[k + 1][0] if k + 1 < len(questions) else speaker.time(speaker.audio.size)
        first = first_sound_after(speaker, end)
        if first is not None and first >= until:
            first = None
        reply_end = None
        gaps: list[float] = []
        if first is not None:
            a, b = speaker.index(first), speaker.index(until)
            loud = np.flatnonzero(np.abs(speaker.audio[a:b]) > 0.003)
            reply_end = speaker.time(a + int(loud[-1]) + 1)
            gaps = gaps_within(speaker, first, reply_end)
        turns.append(HeardTurn(end, first, reply_end, max(gaps, default=0.0), sum(g > 0.050 for g in gaps)))
    return turns
