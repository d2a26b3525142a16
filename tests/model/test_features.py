"""Whisper log-mel features against transformers' independent numpy implementation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor

from omni_cli.errors import AudioInputError
from omni_cli.model.features import (
    CHUNK_SAMPLES,
    HOP_LENGTH,
    WHISPER_SAMPLE_RATE,
    log_mel_spectrogram,
    split_into_windows,
)

N_MELS = 128


def _question_16k(wav: Path) -> np.ndarray:
    audio, rate = soundfile.read(wav, dtype="float32")
    assert rate == 22050
    # 16000 / 22050 = 320 / 441
    return resample_poly(audio, 320, 441).astype(np.float32)


def _numpy_log_mel(audio: np.ndarray, pad_to: int | None) -> np.ndarray:
    """transformers' numpy STFT path (not torch.stft), padding done here as pad_or_trim does."""
    if pad_to is not None:
        audio = np.pad(audio[:pad_to], (0, max(0, pad_to - len(audio))))
    extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    return extractor._np_extract_fbank_features(audio[None].astype(np.float32), "cpu")[0]


def test_padded_log_mel_matches_numpy_whisper_on_real_speech(question_wavs: list[Path]) -> None:
    audio = _question_16k(question_wavs[0])
    ours = log_mel_spectrogram(audio, n_mels=N_MELS)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == (N_MELS, 3000)
    reference = _numpy_log_mel(audio, CHUNK_SAMPLES)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4, rtol=0)
    # Real speech, not silence: the features span Whisper's dynamic range.
    assert ours.max() - ours.min() > 1.0


def test_unpadded_log_mel_matches_numpy_whisper(question_wavs: list[Path]) -> None:
    audio = _question_16k(question_wavs[1])
    ours = log_mel_spectrogram(torch.from_numpy(audio), n_mels=N_MELS, pad_to=None)
    assert tuple(ours.shape) == (N_MELS, len(audio) // HOP_LENGTH)
    np.testing.assert_allclose(ours.numpy(), _numpy_log_mel(audio, None), atol=1e-4, rtol=0)


def test_long_input_is_trimmed_to_thirty_seconds() -> None:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(CHUNK_SAMPLES + 3 * WHISPER_SAMPLE_RATE).astype(np.float32) * 0.1
    # Make the part past 30 s very loud so keeping any of it would move the log-mel's max clamp.
    audio[CHUNK_SAMPLES:] *= 100.0
    trimmed = log_mel_spectrogram(audio, n_mels=N_MELS)
    assert tuple(trimmed.shape) == (N_MELS, 3000)
    torch.testing.assert_close(trimmed, log_mel_spectrogram(audio[:CHUNK_SAMPLES].copy(), n_mels=N_MELS))
    np.testing.assert_allclose(trimmed.numpy(), _numpy_log_mel(audio, CHUNK_SAMPLES), atol=1e-4, rtol=0)


def test_other_mel_sizes_and_short_padding() -> None:
    audio = np.sin(np.arange(8000, dtype=np.float32) * 0.05)
    mel = log_mel_spectrogram(audio, n_mels=80, pad_to=16000)
    assert tuple(mel.shape) == (80, 100)
    # Padding with silence: the padded half is at the clamp floor (log.max() - 8 → (max - 8 + 4) / 4).
    assert torch.allclose(mel[:, 60:], torch.full_like(mel[:, 60:], mel.max().item() - 2.0))


def test_rejects_stereo_and_too_short_audio() -> None:
    with pytest.raises(AudioInputError, match="mono"):
        log_mel_spectrogram(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(AudioInputError, match="too short"):
        log_mel_spectrogram(np.zeros(100, dtype=np.float32), pad_to=None)


def test_windows_cover_every_sample_in_order() -> None:
    window = 1000
    audio = np.arange(3 * window + 123, dtype=np.float32)
    pieces = split_into_windows(audio, window=window)
    assert [len(piece) for piece in pieces] == [window, window, window, 123]
    np.testing.assert_array_equal(np.concatenate(pieces), audio)


def test_short_and_exact_inputs_are_one_window() -> None:
    exact = np.ones(CHUNK_SAMPLES, dtype=np.float32)
    assert len(split_into_windows(exact)) == 1
    assert len(split_into_windows(exact[:10])) == 1
    longer = np.ones(CHUNK_SAMPLES + 1, dtype=np.float32)
    assert [len(piece) for piece in split_into_windows(longer)] == [CHUNK_SAMPLES, 1]
