"""`omni transcribe-and-reply`: answer each audio file in turn, text streamed to stdout, speech to --out.

Nothing here may cost a user a file. Every input and the --out directory are checked before
the model loads (this module imports no torch), one bad file never stops the others (its error
is one line, and a JSON object with --json), a reply never replaces an existing file (a taken
name gets -2, -3, ...), and a reply cut short (Ctrl-C, a fault in the model) is saved only as
NAME.partial.wav. Ctrl-C stops the reply in progress at its next token, says what was kept and
how to continue, and exits with 130; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE, AudioFile, is_silent, load_audio, read_audio_file, resample, save_wav
from omni_cli.config import WHISPER_WINDOW_SAMPLES
from omni_cli.errors import AudioInputError, OmniError, one_line
from omni_cli.stop_request import StopRequest
from omni_cli.terminal import printable

if TYPE_CHECKING:
    from omni_cli.pipeline import SpeechToSpeech

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
_C1 = re.compile("[\x7f-\x9f]")


@dataclass(frozen=True)
class CheckedInput:
    """One input file after the checks made before the model loads."""

    path: Path
    error: str | None = None  # why it cannot be answered; None when it can
    warnings: tuple[str, ...] = ()
    audio: AudioFile | None = None  # what a pipe brought (it cannot be read again); files are read again when answered


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
        """One line of JSON; keys with no value are left out.

        json escapes C0 control characters itself; DEL and C1 (which a terminal may obey) are escaped too.
        """
        data = {k: v for k, v in self.__dict__.items() if v is not None}
        return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(data, ensure_ascii=False))


def check_out_dir(out_dir: Path) -> None:
    """Make sure replies can be written to `out_dir` (created if missing), before any is generated."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OmniError(f"--out {out_dir} is a file, not a directory; give a directory for the replies (it is created if missing).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OmniError(f"--out {out_dir}: cannot create the directory ({exc.strerror or one_line(exc)}); choose a writable place.") from exc
    probe = out_dir / f".omni-write-test-{secrets.token_hex(4)}"
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise OmniError(f"--out {out_dir} is not writable ({exc.strerror or one_line(exc)}); choose a directory you can write to.") from exc


def check_inputs(files: Sequence[Path], err: TextIO) -> list[CheckedInput]:
    """Read every input once before the model loads; one `omni: error:`/`omni: warning:` line per problem to `err`."""
    checked = []
    for path in files:
        try:
            audio = read_audio_file(path)
            if is_silent(audio.samples, rate=audio.rate):
                raise AudioInputError(f"{path}: only silence (no sound above -50 dBFS); nothing to answer.")
        except AudioInputError as exc:
            err.write(f"omni: error: {exc}\n")
            checked.append(CheckedInput(path, error=str(exc)))
            continue
        for warning in audio.warnings:
            err.write(f"omni: warning: {warning}\n")
        checked.append(CheckedInput(path, warnings=audio.warnings, audio=audio if audio.streamed else None))
    err.flush()
    return checked


def answer_file(
    pipeline: SpeechToSpeech,
    item: CheckedInput,
    out_dir: Path | None,
    stream_to: TextIO | None,
    reply: FileReply,
    stop: StopRequest | None = None,
) -> None:
    """Answer one file into `reply`, filled as the reply streams.

    Bad input raises OmniError before anything is produced. A reply cut short (a fault in the
    model, or a second Ctrl-C) re-raises after its text and audio so far are kept; one stopped
    by `stop` (a first Ctrl-C) returns with `reply.stopped == "interrupted"`. Either way the audio
    goes to OUT/NAME.partial.wav, never under the name of a complete reply; a Ctrl-C during that
    save waits for it. A reply that cannot be saved raises OmniError after its text is complete.
    """
    from omni_cli.pipeline import AudioChunk, Done, TextDelta  # torch: only once there is a file to answer

    path = item.path
    audio = load_audio(path) if item.audio is None else resample(item.audio.samples, item.audio.rate)
    notes = list(item.warnings)
    windows = math.ceil(len(audio) / WHISPER_WINDOW_SAMPLES)
    if windows > 1:
        window_s = WHISPER_WINDOW_SAMPLES / SAMPLE_RATE
        notes.append(f"{len(audio) / SAMPLE_RATE:.1f} s of speech is longer than {window_s:g} s: encoded in {windows} windows of {window_s:g} s")
    chunks: list[np.ndarray] = []
    rate = SAMPLE_RATE
    failure: BaseException | None = None
    start = time.monotonic()
    try:
        for event in pipeline.respond(audio, should_stop=stop.is_requested if stop is not None else None):
            if isinstance(event, TextDelta):
                if reply.first_text_ms is None:
                    reply.first_text_ms = round((event.t - start) * 1000, 1)
                reply.text += event.text
                if stream_to is not None:
                    stream_to.write(printable(event.text))  # the model may emit ESC, NUL, ...: not for a terminal
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
    except BaseException as exc:  # a fault inside the model, or a second Ctrl-C: keep what was produced first
        failure = exc
    interrupted = isinstance(failure, KeyboardInterrupt) or reply.stopped == "interrupted"
    complete = failure is None and not interrupted
    if complete and pipeline.vocoder is not None and not reply.units:
        notes.append("the speech decoder produced no units for this reply; no WAV written")
    if interrupted:
        notes.append("interrupted by Ctrl-C; the text and audio so far are kept")
    elif not complete:
        notes.append("the reply was cut short by an error; the text and audio so far are kept")
    save_error: OmniError | None = None
    if chunks:
        audio_out = np.concatenate(chunks)
        reply.audio_seconds = round(len(audio_out) / rate, 3)
        if out_dir is not None:
            name = f"{path.stem}.wav" if complete else f"{path.stem}.partial.wav"
            try:
                with stop.held() if stop is not None else nullcontext():
                    reply.wav = str(save_wav(out_dir / name, audio_out, rate, overwrite=False))
            except OSError as exc:
                save_error = OmniError(
                    f"{path}: could not save the spoken reply in {out_dir} ({exc.strerror or one_line(exc)}); "
                    "its text is kept. Free some space or choose another --out."
                )
    reply.note = "; ".join(notes) or None
    if failure is not None:
        raise failure
    if save_error is not None:
        raise save_error


def transcribe_and_reply(
    pipeline: SpeechToSpeech | None,
    inputs: Sequence[CheckedInput],
    out_dir: Path | None,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Answer every input that passed `check_inputs` (whose errors were printed already).

    Returns the exit status: 0, 1 if any file failed, 130 after Ctrl-C. `pipeline` may be None
    when no input can be answered.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    failed = answered = 0
    cut: FileReply | None = None  # the reply Ctrl-C stopped
    stopped_at: int | None = None  # the first input Ctrl-C left unanswered
    with StopRequest() as ctrl_c:  # the first Ctrl-C stops the reply at its next token; a second at once
        for i, item in enumerate(inputs):
            if ctrl_c.requested:
                stopped_at = i
                break
            reply = FileReply(file=str(item.path))
            if item.error is not None:
                failed += 1
                if as_json:
                    reply.error = item.error
                    out.write(reply.to_json() + "\n")
                continue
            assert pipeline is not None, "a file to answer needs the pipeline"
            if not as_json:
                out.write(f"{item.path.name}: ")
                out.flush()
            error: OmniError | None = None
            try:
                answer_file(pipeline, item, out_dir, None if as_json else out, reply, ctrl_c)
            except KeyboardInterrupt:
                reply.stopped = "interrupted"
            except (OmniError, RuntimeError) as exc:
                # RuntimeError covers CUDA out-of-memory and similar faults inside the model:
                # one file failing must not lose the answers to the others, nor its own partial reply.
                error = exc if isinstance(exc, OmniError) else OmniError(f"{item.path}: the model failed on this file ({one_line(exc)})")
                reply.error = str(error)
            out.write(reply.to_json() + "\n" if as_json else "\n")
            out.flush()
            if error is not None:
                failed += 1
                err.write(f"omni: error: {error}\n")
                if reply.wav:
                    err.write(f"  the reply so far: {reply.wav} ({reply.audio_seconds:.2f} s)\n")
            if reply.stopped == "interrupted":
                cut, stopped_at = reply, i
                break
            if error is not None:
                continue
            answered += 1
            if not as_json:
                details = [f"{reply.tokens} tokens", f"{reply.total_ms / 1000:.2f} s"]
                if reply.first_audio_ms is not None:
                    details.append(f"first audio after {reply.first_audio_ms:.0f} ms")
                if reply.wav:
                    details.append(f"speech: {reply.wav} ({reply.audio_seconds:.2f} s)")
                err.write(f"  [{', '.join(details)}]\n")
                if reply.note:
                    err.write(f"  note: {reply.note}\n")
        # Still under the StopRequest: a Ctrl-C pressed again now cannot cut the line that says what was kept.
        remaining = [] if stopped_at is None else [item.path for item in inputs[stopped_at:] if item.error is None]
        if not remaining:
            return 1 if failed else 0
        err.write(interrupted_line(cut, answered, len(inputs), out_dir, remaining) + "\n")
        err.flush()
        return EXIT_INTERRUPTED


def interrupted_line(cut: FileReply | None, answered: int, total: int, out_dir: Path | None, remaining: Sequence[Path]) -> str:
    """The one line after Ctrl-C: what was kept, and the files to run the command on again."""
    if cut is None:
        what = f"stopped before {remaining[0].name}"
    elif out_dir is None:
        what = f"{Path(cut.file).name} was cut short (its text so far is printed)"
    elif cut.wav:
        what = f"{Path(cut.file).name} was cut short; its partial reply is {cut.wav} ({cut.audio_seconds:.2f} s)"
    else:
        what = f"{Path(cut.file).name} was cut short; no audio of it was saved"
    kept = f" (in {out_dir})" if out_dir is not None and answered else ""
    return (
        f"omni: interrupted: {what}; {answered} of {total} files answered in full{kept}. "
        f"To continue, run the same command on: {shlex.join(map(str, remaining))}"
    )
