"""Audio files in and out: anything soundfile reads becomes 16 kHz mono float32."""

from __future__ import annotations

import errno
import io
import os
import secrets
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from omni_cli.errors import AudioInputError, one_line

SAMPLE_RATE = 16000
# Below this no speech recording is plausible (telephone speech is 8 kHz): the header is wrong.
MIN_SPEECH_RATE = 8000


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


def read_audio_file(path: str | Path) -> AudioFile:
    """Read `path` (WAV, FLAC, OGG, ... any rate or channel count) as mono float32 at its own rate.

    Raises AudioInputError with one line for a missing, unreadable, damaged or empty file.
    Warns (in `warnings`) about a file shorter than its header says — a truncated copy is
    answered from what it holds — and about a sample rate no speech is recorded at.
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: no such file.")
    if path.is_dir():
        raise AudioInputError(f"{path} is a directory; give an audio file.")
    if not os.access(path, os.R_OK):
        raise AudioInputError(f"{path}: permission denied; make the file readable (chmod +r).")
    blocks: list[np.ndarray] = []
    try:
        with sf.SoundFile(str(path)) as f:
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
        raise AudioInputError(f"{path}: not a readable audio file ({one_line(exc)}); convert it to WAV or FLAC.") from exc
    data = np.concatenate(blocks) if blocks else np.zeros((0, 1), dtype=np.float32)
    if data.shape[0] == 0:
        raise AudioInputError(f"{path}: the audio is empty (0 samples).")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioInputError(f"{path}: the audio holds NaN or infinite samples; re-export it.")
    warnings: list[str] = []
    promised_seconds = _wav_promised_seconds(path, len(mono), rate) or promised / rate
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
    return AudioFile(mono, rate, tuple(warnings))


def _wav_promised_seconds(path: Path, frames_held: int, rate: int) -> float | None:
    """For a RIFF WAV, the length its `data` chunk header declares, in seconds; None for other files.

    libsndfile quietly shortens a truncated WAV to the bytes present, so the header is the only
    place that still says how long the recording was.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = os.fstat(f.fileno()).st_size
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
