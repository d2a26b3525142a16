"""Whisper log-mel features: the exact input the Whisper encoder was trained on.

Matches openai-whisper's `pad_or_trim` + `log_mel_spectrogram`, which is what the reference
LLaMA-Omni feeds its encoder. The STFT settings below are Whisper's fixed front end, not
model sizes; the number of mel bins comes from the encoder's config.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from omni_cli.config import WHISPER_WINDOW_SAMPLES as CHUNK_SAMPLES  # 30 s: what one encoder pass covers
from omni_cli.errors import AudioInputError

WHISPER_SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160

# Whisper's filters span 0 Hz to Nyquist of 16 kHz audio.
_MEL_MAX_HZ = WHISPER_SAMPLE_RATE / 2


@lru_cache(maxsize=8)
def _mel_filters(n_mels: int, device: str) -> torch.Tensor:
    """Slaney-normalised, Slaney-scale mel filters as a (n_mels, N_FFT//2 + 1) float32 matrix."""
    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=_MEL_MAX_HZ,
        sampling_rate=WHISPER_SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters.T.astype(np.float32)).to(device)


@lru_cache(maxsize=8)
def _hann_window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 128,
    pad_to: int | None = CHUNK_SAMPLES,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Log-mel features (n_mels, frames) float32 of 16 kHz mono audio, as openai-whisper computes them.

    With `pad_to` (default 30 s) the audio is zero-padded or trimmed to that many samples first,
    giving `pad_to // HOP_LENGTH` frames (3000 for 30 s), exactly the reference's input.
    With `pad_to=None` the audio is used as is (variable length).
    """
    samples = torch.as_tensor(audio)
    if samples.ndim != 1:
        raise AudioInputError(
            f"expected mono audio as a 1-D array, got shape {tuple(samples.shape)}; mix down to one channel first"
        )
    if device is not None:
        samples = samples.to(device)
    samples = samples.to(torch.float32)
    if pad_to is not None:
        samples = samples[:pad_to]
        samples = torch.nn.functional.pad(samples, (0, pad_to - samples.shape[0]))
    if samples.shape[0] <= N_FFT // 2:
        # torch.stft's reflect padding needs more than half a window of samples.
        raise AudioInputError(
            f"audio has {samples.shape[0]} samples, too short for a log-mel frame; "
            f"give at least {N_FFT // 2 + 1} samples ({(N_FFT // 2 + 1) / WHISPER_SAMPLE_RATE * 1000:.0f} ms)"
        )
    device_key = str(samples.device)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=_hann_window(device_key), return_complex=True)
    # Whisper drops the last STFT frame so 30 s gives exactly 3000 frames.
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = _mel_filters(n_mels, device_key) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    # Whisper's dynamic-range clamp (80 dB below the loudest bin) and rescaling to about [-1, 1].
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def split_into_windows(audio: np.ndarray, window: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Consecutive `window`-sample pieces covering all of `audio` (the last may be shorter).

    Whisper sees at most 30 s at a time; the reference silently truncates longer input,
    so callers encode long speech window by window instead.
    """
    if window <= 0:
        raise ValueError(f"window must be a positive number of samples, got {window}")
    if len(audio) <= window:
        return [audio]
    return [audio[start : start + window] for start in range(0, len(audio), window)]
