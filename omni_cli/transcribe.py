"""`omni transcribe-and-reply`: answer each audio file in turn, text streamed to stdout, speech to --out.

One bad file never stops the others: its error is printed as one line (and as a JSON object
with --json) and the next file is answered.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE, is_silent, load_audio, save_wav
from omni_cli.errors import AudioInputError, OmniError, one_line
from omni_cli.model.features import CHUNK_SAMPLES, split_into_windows
from omni_cli.pipeline import AudioChunk, Done, SpeechToSpeech, TextDelta


@dataclass
class FileReply:
    """What one file produced, for the JSON line and the summary."""

    file: str
    text: str = ""
    units: list[int] | None = None
    wav: str | None = None
    tokens: int = 0
    stopped: str = ""
    audio_seconds: float = 0.0
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    total_ms: float = 0.0
    note: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        """One line of JSON; keys with no value are left out."""
        data = {k: v for k, v in self.__dict__.items() if v is not None}
        return json.dumps(data, ensure_ascii=False)


def answer_file(pipeline: SpeechToSpeech, path: Path, out_dir: Path | None, stream_to: TextIO | None, reply: FileReply) -> None:
    """Answer one file into `reply`, filled as the reply streams.

    Bad input raises OmniError before anything is produced. A failure halfway through a
    reply also raises, but `reply` keeps the text so far and the audio so far is written.
    """
    audio = load_audio(path)
    if is_silent(audio):
        raise AudioInputError(f"{path}: only silence (no sound above -50 dBFS); nothing to answer.")
    notes: list[str] = []
    windows = len(split_into_windows(audio, CHUNK_SAMPLES))
    if windows > 1:
        notes.append(f"{len(audio) / SAMPLE_RATE:.1f} s of speech is longer than 30 s: encoded in {windows} windows of 30 s")
    chunks: list[np.ndarray] = []
    rate = SAMPLE_RATE
    finished = False
    start = time.monotonic()
    try:
        for event in pipeline.respond(audio):
            if isinstance(event, TextDelta):
                if reply.first_text_ms is None:
                    reply.first_text_ms = round((event.t - start) * 1000, 1)
                reply.text += event.text
                if stream_to is not None:
                    stream_to.write(event.text)
                    stream_to.flush()
            elif isinstance(event, AudioChunk):
                if reply.first_audio_ms is None:
                    reply.first_audio_ms = round((event.t - start) * 1000, 1)
                chunks.append(event.audio)
                rate = event.sample_rate
            elif isinstance(event, Done):
                reply.text, reply.tokens, reply.stopped = event.text, event.tokens, event.stopped
                reply.total_ms = round((event.t - start) * 1000, 1)
                if pipeline.vocoder is not None:
                    reply.units = event.units
        finished = True
    finally:
        if pipeline.vocoder is not None and finished and not reply.units:
            notes.append("the speech decoder produced no units for this reply; no WAV written")
        if chunks:
            audio_out = np.concatenate(chunks)
            reply.audio_seconds = round(len(audio_out) / rate, 3)
            if out_dir is not None:
                reply.wav = str(save_wav(out_dir / f"{path.stem}.wav", audio_out, rate))
            if not finished:
                notes.append("the reply was cut short by an error; the text and audio so far are kept")
        reply.note = "; ".join(notes) or None


def transcribe_and_reply(
    pipeline: SpeechToSpeech,
    files: Sequence[Path],
    out_dir: Path | None,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Answer every file; return the number of files that failed."""
    out = out or sys.stdout
    err = err or sys.stderr
    failed = 0
    for path in files:
        if not as_json:
            out.write(f"{path.name}: ")
            out.flush()
        reply = FileReply(file=str(path))
        try:
            answer_file(pipeline, path, out_dir, None if as_json else out, reply)
        except (OmniError, RuntimeError) as exc:
            # RuntimeError covers CUDA out-of-memory and similar faults inside the model:
            # one file failing must not lose the answers to the others, nor its own partial reply.
            if not isinstance(exc, OmniError):
                exc = OmniError(f"{path}: the model failed on this file ({one_line(exc)})")
            failed += 1
            if as_json:
                reply.error = str(exc)
                out.write(reply.to_json() + "\n")
            else:
                out.write("\n")
            err.write(f"omni: error: {exc}\n")
            if reply.wav:
                err.write(f"  the reply so far: {reply.wav} ({reply.audio_seconds:.2f} s)\n")
            continue
        if as_json:
            out.write(reply.to_json() + "\n")
        else:
            out.write("\n")
            details = [f"{reply.tokens} tokens", f"{reply.total_ms / 1000:.2f} s"]
            if reply.first_audio_ms is not None:
                details.append(f"first audio after {reply.first_audio_ms:.0f} ms")
            if reply.wav:
                details.append(f"speech: {reply.wav} ({reply.audio_seconds:.2f} s)")
            err.write(f"  [{', '.join(details)}]\n")
            if reply.note:
                err.write(f"  note: {reply.note}\n")
        out.flush()
    return failed
