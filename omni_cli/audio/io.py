"""Audio files in and out: anything soundfile reads becomes 16 kHz mono float32."""

from __future__ import annotations

import os
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from omni_cli.errors import AudioInputError

SAMPLE_RATE = 16000


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from `rate` to `target`."""
    if rate == target:
        return audio.astype(np.float32, copy=False)
    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def load_audio(path: str | Path, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read `path` (WAV, FLAC, OGG, ... any rate or channel count) as mono float32 at `target_rate`.

    Raises AudioInputError with one line for a missing, unreadable or empty file.
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"{path}: no such file.")
    if path.is_dir():
        raise AudioInputError(f"{path} is a directory; give an audio file.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(f"{path}: not a readable audio file ({exc}); convert it to WAV or FLAC.") from exc
    if data.shape[0] == 0:
        raise AudioInputError(f"{path}: the audio is empty (0 samples).")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioInputError(f"{path}: the audio holds NaN or infinite samples; re-export it.")
    return resample(mono, int(rate), target_rate)


def save_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write float32 mono audio as a 16-bit PCM WAV, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    sf.write(str(tmp), np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path


def is_silent(audio: np.ndarray, threshold_dbfs: float = -50.0) -> bool:
    """True when the loudest 30 ms stretch stays below `threshold_dbfs` (no speech to answer)."""
    frame = max(1, SAMPLE_RATE * 30 // 1000)
    n = len(audio) // frame
    if n == 0:
        rms = float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0
    else:
        frames = audio[: n * frame].reshape(n, frame)
        rms = float(np.sqrt(np.mean(np.square(frames), axis=1)).max())
    return rms <= 10 ** (threshold_dbfs / 20)
