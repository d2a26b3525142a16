"""A chat session on disk: transcript.jsonl and the turns' WAVs, written as they happen.

One folder per session. Each line of transcript.jsonl is one JSON object {"type": ..., "time":
..., ...}: "session" (devices, echo cancellation, turn-taking settings), "listening", "user"
and "assistant" (one per turn, see `UserRecord` and `ReplyRecord`), "barge_in", "full_duplex"
(barge-in turned on once the echo canceller converged), "speculative_reply_dropped" (a reply
started at a pause, thrown away as the user spoke on), "long_speech" (a question passed a 30 s
window), "error" and "end". Times named `*_t` are
time.monotonic() seconds (the clock the audio and pipeline events use); `time` is the wall
clock for people.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE, save_wav
from omni_cli.destinations import unwritable_reason
from omni_cli.errors import ConfigError
from omni_cli.terminal import NATIVE_LOG_NAME

TRANSCRIPT_NAME = "transcript.jsonl"
TURN_WAV = re.compile(r"turn-\d{3,}-(user|reply)(-\d+)?\.wav")  # the audio files a session writes


def refuse_used_session_dir(directory: Path) -> None:
    """Raise ConfigError unless a new session can be written to `directory` without touching anything there.

    Refused: a file; a place nothing can be written (read-only, not writable); a folder holding
    any file a session writes (transcript.jsonl, native.log, turn-NNN-*.wav), so another
    session's transcript is never appended to and no turn WAV of it is replaced.
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--session-dir {directory} is a file; give a folder (it is created if missing).")
    if (directory / TRANSCRIPT_NAME).exists():
        raise ConfigError(f"{directory} already holds a session ({TRANSCRIPT_NAME}); pick a new --session-dir.")
    if directory.is_dir():
        taken = sorted(p.name for p in directory.iterdir() if p.name == NATIVE_LOG_NAME or TURN_WAV.fullmatch(p.name))
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise ConfigError(f"{directory} already holds {taken[0]}{more}, which a session writes; pick a new --session-dir.")
    reason = unwritable_reason(directory)
    if reason is not None:
        raise ConfigError(f"cannot write the session to {directory}: {reason}; pick another --session-dir.")


def default_session_dir(root: Path = Path("omni-sessions")) -> Path:
    """./omni-sessions/<UTC timestamp>: a fresh folder per session."""
    return root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class TurnRecord:
    """A transcript line about one turn; fields that are None are left out of the line."""

    kind: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        """The line's fields in declaration order (the JSON keys' order), without the None ones."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class UserRecord(TurnRecord):
    """What the user said: typed `text`, or the speech saved as `wav` and its length."""

    kind: ClassVar[str] = "user"
    turn: int
    end_t: float  # when the user's turn ended: the endpoint decision, or Enter for typed text
    speech_end_t: float | None = None  # spoken: the end of the last voiced frame (the true end of speech)
    end_of_turn_ms: float | None = None  # spoken: from speech_end_t to the endpoint decision (the hang-over)
    text: str | None = None
    wav: str | None = None
    seconds: float | None = None
    windows: int | None = None  # a question longer than the model's 30 s window: how many it spans
    continues: int | None = None  # this question goes on with that turn's (whose reply was withdrawn); the WAV holds both
    decided_t: float | None = None  # spoken: when omni acted on the end of the turn (end_t is when its last frame was heard)


@dataclass(frozen=True)
class ReplyRecord(TurnRecord):
    """What omni answered, how it ended ("eos", "budget", "interrupted", "error") and when it was seen and heard."""

    kind: ClassVar[str] = "assistant"
    turn: int
    text: str
    tokens: int
    units: int
    stopped: str
    wav: str | None = None
    audio_seconds: float | None = None  # the WAV's length: what was heard, for a reply cut short
    heard_seconds: float | None = None  # a reply cut short (barge-in, Ctrl-C, a fault): how much of it was played
    first_text_ms: float | None = None  # from the end of the user's speech (or Enter) to the first text on screen
    playback_t: float | None = None  # when the reply's first audio was handed to the speaker's queue
    first_audio_t: float | None = None  # when the reply's first sample came out of the speaker (handed to the device + its latency)
    latency_ms: float | None = None  # from the end of the user's speech (or Enter) to first_audio_t: what the user waited
    speculative: bool | None = None  # started at a pause in the user's speech, before the turn was over
    barge_in_t: float | None = None
    withdrawn: bool | None = None  # the user went on with the question within ChatSettings.rejoin_ms: not an answer
    echo_erle_db: float | None = None  # the echo canceller's echo removal over the last ~1 s of reply
    error: str | None = None


class SessionRecorder:
    """Writes a session folder as it goes: transcript.jsonl plus turn-NNN-user.wav / turn-NNN-reply.wav.

    Nothing is written until there is something to keep: the folder and the transcript appear
    with the first line (a session stopped while its devices open leaves nothing that would block
    the folder's reuse). Every transcript line is flushed and fsynced when written, and WAVs are
    written atomically and never over an existing file, so a crash loses nothing already said.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.transcript_path = self.directory / TRANSCRIPT_NAME
        refuse_used_session_dir(self.directory)
        self._file: TextIO | None = None
        self._closed = False

    def _open(self) -> TextIO:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # "x": a transcript that appeared since the folder was checked is never appended to. Text that
            # cannot be UTF-8 (a lone surrogate from undecodable input) is written escaped, never lost to an error.
            return open(self.transcript_path, "x", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"cannot write the session to {self.directory}: {exc.strerror or exc}; pick another --session-dir.") from exc

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one JSON line {"type": kind, "time": ..., **fields} and make it durable (the first one creates the transcript)."""
        record = {"type": kind, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}
        if self._closed:
            return record
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def question(self, turn: int, end_t: float, question: np.ndarray | str, **timings: Any) -> None:
        """The "user" line: typed text, or 16 kHz speech saved as turn-NNN-user.wav with its length;
        `timings`: UserRecord's speech_end_t, end_of_turn_ms, windows, continues."""
        if isinstance(question, str):
            record = UserRecord(turn, end_t, text=question, **timings)
        else:
            wav = self.save_audio(turn, "user", question, SAMPLE_RATE)
            record = UserRecord(turn, end_t, wav=wav, seconds=round(question.size / SAMPLE_RATE, 3), **timings)
        self.event(record.kind, **record.fields())

    def reply(self, record: ReplyRecord, audio: np.ndarray | None, rate: int) -> ReplyRecord:
        """The "assistant" line, after saving the reply's audio (if any) as turn-NNN-reply.wav; returns the line as written."""
        if audio is not None and audio.size:
            wav = self.save_audio(record.turn, "reply", audio, rate)
            record = replace(record, wav=wav, audio_seconds=round(audio.size / rate, 3))
        self.event(record.kind, **record.fields())
        return record

    def save_audio(self, turn: int, role: str, audio: np.ndarray, rate: int) -> str:
        """Write turn-NNN-<role>.wav; returns its name (relative to the session folder)."""
        path = save_wav(self.directory / f"turn-{turn:03d}-{role}.wav", audio, rate, overwrite=False)
        return path.name

    def close(self) -> None:
        """Close the transcript; later events are ignored."""
        self._closed = True
        if self._file is not None and not self._file.closed:
            self._file.close()
