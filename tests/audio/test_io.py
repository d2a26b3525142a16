"""audio/io.py: what a damaged file is reported as, and writing replies without replacing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni_cli.audio.io import read_audio_file, save_wav
from omni_cli.errors import AudioInputError


def test_an_intact_file_has_no_warnings_in_any_format(question_wavs, tmp_path: Path) -> None:
    audio, rate = sf.read(question_wavs[0], dtype="float32")
    for suffix in [".wav", ".flac", ".ogg"] + ([".mp3"] if "MP3" in sf.available_formats() else []):
        path = tmp_path / f"q{suffix}"
        sf.write(path, audio, rate)
        read = read_audio_file(path)
        assert read.rate == rate and read.warnings == (), suffix
        assert abs(len(read.samples) - len(audio)) < rate // 10, suffix


def test_a_truncated_file_is_said_to_be_cut_short(question_wavs, tmp_path: Path) -> None:
    data = question_wavs[0].read_bytes()
    wav = tmp_path / "cut.wav"
    wav.write_bytes(data[: len(data) // 4])
    read = read_audio_file(wav)
    assert len(read.warnings) == 1 and "header promises 2.16 s but it holds 0.54 s" in read.warnings[0]

    # FLAC's decoder fails part-way instead: an error saying where, not "convert it to WAV".
    audio, rate = sf.read(question_wavs[0], dtype="float32")
    flac = tmp_path / "q.flac"
    sf.write(flac, np.tile(audio, 4), rate)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(AudioInputError, match=r"decoding failed after \d+\.\d\d s of 8\.64 s .*truncated or damaged"):
        read_audio_file(cut)


def test_save_wav_never_replaces_a_file_unless_asked(tmp_path: Path) -> None:
    tone = 0.1 * np.sin(np.arange(1600, dtype=np.float32))
    mine = tmp_path / "q.wav"
    mine.write_bytes(b"the user's own file")
    assert save_wav(mine, tone, overwrite=False) == tmp_path / "q-2.wav"
    assert save_wav(mine, tone, overwrite=False) == tmp_path / "q-3.wav"
    assert mine.read_bytes() == b"the user's own file"
    assert save_wav(mine, tone) == mine  # chat's turn files: written in place
    assert sf.read(mine)[0].shape == (1600,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q-2.wav", "q-3.wav", "q.wav"]  # no .part left
