"""Audio files in and out: anything soundfile reads becomes 16 kHz mono float32."""

from __future__ import annotations

import errno
import io
import os
import secrets
import select
import stat
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from omni_cli.errors import AudioInputError, one_line

SAMPLE_RATE = 16000
# Below this no speech recording is plausible (telephone speech is 8 kHz): the header is wrong.
MIN_SPEECH_RATE = 8000
# Shorter than this holds no question (a word takes a few tenths of a second): answered, with a warning.
MIN_SPEECH_SECONDS = 0.1
# A pipe or FIFO is read whole before anything else: how long to wait for its first byte (a FIFO
# nobody writes to would block for good), and the most it may bring.
PIPE_FIRST_BYTE_S = 0.5
MAX_PIPE_BYTES = 512 * 2**20


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from `rate` to `target`."""
    if rate == target:
        return audio.astype(np.float32, copy=False)
    # Imported here: scipy.signal takes 1-2 s to import, and `omni chat` checks its devices
    # (through transcript.py, which imports this module) within 2 s of starting.
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


@dataclass(frozen=True)
class AudioFile:
    """A file's audio as read (mono float32 at its own rate) and what looked wrong about it."""

    samples: np.ndarray
    rate: int
    warnings: tuple[str, ...] = ()
    streamed: bool = False  # read from a pipe or FIFO, which cannot be read again: keep these samples


def read_pipe(path: Path, first_byte_s: float = PIPE_FIRST_BYTE_S, limit: int = MAX_PIPE_BYTES) -> bytes:
    """Everything a pipe or FIFO (`<(cat q.wav)`, `mkfifo`) brings, read once.

    A FIFO nobody writes to would block for good: nothing within `first_byte_s` is an
    AudioInputError, as is more than `limit` bytes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO without a writer would block too
    try:
        ready, _, _ = select.select([fd], [], [], first_byte_s)
        if not ready:
            raise AudioInputError(
                f"{path}: nothing came through this pipe within {first_byte_s:g} s (no writer?); "
                "give an audio file, or start what writes to the pipe first."
            )
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while block := os.read(fd, 1 << 20):
            total += len(block)
            if total > limit:
                raise AudioInputError(f"{path}: more than {limit // 2**20} MiB came through this pipe; save the audio to a file first.")
            chunks.append(block)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_audio_file(path: str | Path) -> AudioFile:
    """Read `path` (WAV, FLAC, OGG, ... any rate or channel count) as mono float32 at its own rate.

    Raises AudioInputError with one line for a missing, unreadable, damaged or empty file, and
    for a device or socket; a pipe or FIFO is read whole first (`read_pipe`). Warns (in
    `warnings`) about a file shorter than its header says — a truncated copy is answered from
    what it holds —, about a sample rate no speech is recorded at, and about audio shorter than
    MIN_SPEECH_SECONDS.
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: no such file.")
    if path.is_dir():
        raise AudioInputError(f"{path} is a directory; give an audio file.")
    if not os.access(path, os.R_OK):
        raise AudioInputError(f"{path}: permission denied; make the file readable (chmod +r).")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise AudioInputError(f"{path} is a device or socket, not a file; give an audio file.")
    streamed = stat.S_ISFIFO(mode)
    data = read_pipe(path) if streamed else None
    source: str | io.BytesIO = io.BytesIO(data) if data is not None else str(path)
    blocks: list[np.ndarray] = []
    try:
        with sf.SoundFile(source) as f:
            rate, promised = int(f.samplerate), int(f.frames)
            try:
                # Block by block, so a decoder that fails part-way says where. (Not f.blocks():
                # it yields whole blocks even where the decoder delivered fewer frames.)
                while len(block := f.read(1 << 14, dtype="float32", always_2d=True)):
                    blocks.append(block)
            except (sf.LibsndfileError, RuntimeError) as exc:
                got = sum(len(b) for b in blocks)
                raise AudioInputError(
                    f"{path}: decoding failed after {got / rate:.2f} s of {promised / rate:.2f} s ({one_line(exc)}): "
                    "the file looks truncated or damaged; re-export or re-copy it."
                ) from exc
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = one_line(exc).replace(repr(source), repr(str(path)))  # a pipe's bytes are named by their path too
        raise AudioInputError(f"{path}: not a readable audio file ({reason}); convert it to WAV or FLAC.") from exc
    frames = np.concatenate(blocks) if blocks else np.zeros((0, 1), dtype=np.float32)
    if frames.shape[0] == 0:
        raise AudioInputError(f"{path}: the audio is empty (0 samples).")
    mono = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioInputError(f"{path}: the audio holds NaN or infinite samples; re-export it.")
    warnings: list[str] = []
    if data is None:
        with open(path, "rb") as file:
            head, size = file.read(1 << 16), os.fstat(file.fileno()).st_size
    else:
        head, size = data[: 1 << 16], len(data)
    promised_seconds = _wav_promised_seconds(head, size, len(mono), rate) or promised / rate
    # 2 % slack: compressed formats (MP3) only estimate their length in the header.
    if len(mono) / rate < 0.98 * promised_seconds:
        warnings.append(
            f"{path}: the file is cut short: its header promises {promised_seconds:.2f} s but it holds "
            f"{len(mono) / rate:.2f} s (a truncated copy?); answering the {len(mono) / rate:.2f} s it holds"
        )
    if rate < MIN_SPEECH_RATE:
        warnings.append(
            f"{path}: a sample rate of {rate} Hz is implausible for speech (below {MIN_SPEECH_RATE} Hz), so its "
            f"{len(mono)} samples are read as {len(mono) / rate:.1f} s; check how the file was written"
        )
    if len(mono) < MIN_SPEECH_SECONDS * rate:
        warnings.append(
            f"{path}: {len(mono) / rate * 1000:.1f} ms of audio ({len(mono)} at {rate} Hz) is shorter than {MIN_SPEECH_SECONDS:g} s: "
            "too short to hold a question; answering it anyway"
        )
    return AudioFile(mono, rate, tuple(warnings), streamed)


def _wav_promised_seconds(head: bytes, size: int, frames_held: int, rate: int) -> float | None:
    """For a RIFF WAV (its first bytes `head`, `size` bytes in all), the length its `data` chunk header
    declares, in seconds; None for other files.

    libsndfile quietly shortens a truncated WAV to the bytes present, so the header is the only
    place that still says how long the recording was.
    """
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            held = size - (pos + 8)
            # 0 and 0xFFFFFFFF are placeholders written by streaming recorders that never came back.
            if length in (0, 0xFFFFFFFF) or held <= 0 or frames_held == 0:
                return None
            return frames_held * (length / held) / rate
        pos += 8 + length + (length & 1)
    return None


def load_audio(path: str | Path, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read `path` (WAV, FLAC, OGG, ... any rate or channel count) as mono float32 at `target_rate`.

    Raises AudioInputError with one line for a missing, unreadable, damaged or empty file;
    `read_audio_file` also says what looked wrong about a file that could be read.
    """
    audio = read_audio_file(path)
    return resample(audio.samples, audio.rate, target_rate)


def save_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE, overwrite: bool = True) -> Path:
    """Write float32 mono audio as a 16-bit PCM WAV, atomically (a crash never leaves half a file).

    With `overwrite=False` an existing file is never replaced: the audio goes to the first free
    name among NAME.wav, NAME-2.wav, NAME-3.wav, ... Returns the path written. Raises OSError
    (disk full, no permission) with no temporary file left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rendered in memory and written with plain file I/O: libsndfile reports a full disk as
    # "System error." and, writing through a Python file, prints an unraisable traceback.
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as f:
            f.write(buffer.getbuffer())
        if overwrite:
            os.replace(tmp, path)
            return path
        return _place_without_overwriting(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _place_without_overwriting(tmp: Path, path: Path) -> Path:
    """Give `tmp` the first free name among `path`, PATH-2, PATH-3, ...; atomic where hard links exist."""
    for n in range(1, 10_000):
        target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(tmp, target)  # fails if target exists: no window in which another file is replaced
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if target.exists():  # a file system without hard links: check, then rename
                continue
            os.replace(tmp, target)
            return target
    raise FileExistsError(errno.EEXIST, "no free file name", str(path))


def is_silent(audio: np.ndarray, threshold_dbfs: float = -50.0, rate: int = SAMPLE_RATE) -> bool:
    """True when the loudest 30 ms stretch stays below `threshold_dbfs` (no speech to answer)."""
    frame = max(1, rate * 30 // 1000)
    n = len(audio) // frame
    if n == 0:
        rms = float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0
    else:
        frames = audio[: n * frame].reshape(n, frame)
        rms = float(np.sqrt(np.mean(np.square(frames), axis=1)).max())
    return rms <= 10 ** (threshold_dbfs / 20)
