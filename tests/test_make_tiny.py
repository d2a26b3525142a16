"""`omni make-tiny`, a newcomer's way to try omni without a GPU: listed in `omni --help`, it writes a tiny model
and a tiny unit extractor and prints the options that use them; the tiny Whisper hears what it is given."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from typer.testing import CliRunner

from omni_cli.cli import app


def test_make_tiny_is_in_the_help() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "make-tiny" in result.stdout


def test_make_tiny_prints_options_for_the_model_and_for_omni_units(tmp_path: Path, question_wavs) -> None:
    made = CliRunner().invoke(app, ["make-tiny", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    model_line, units_line = made.stdout.splitlines()
    assert shlex.split(model_line)[::2] == ["--model", "--speech-encoder", "--vocoder"]
    assert shlex.split(units_line)[::2] == ["--hubert", "--kmeans", "--layer"]
    # The printed options, as printed, label real speech with units the tiny model's speech decoder has.
    out = tmp_path / "units.jsonl"
    labelled = CliRunner().invoke(app, ["units", str(question_wavs[0].parent), "--out", str(out), *shlex.split(units_line)])
    assert labelled.exit_code == 0, labelled.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(question_wavs)
    assert all(row["units"] and all(0 <= u < 1000 for u in row["units"]) for row in rows)
    assert len({tuple(row["units"]) for row in rows}) == len(rows)


def test_the_tiny_whisper_encodes_different_questions_differently(tiny_loaded, question_16k) -> None:
    from omni_cli.model.features import CHUNK_SAMPLES, log_mel_spectrogram

    mels = torch.stack([log_mel_spectrogram(audio, n_mels=tiny_loaded.encoder.n_mels, pad_to=CHUNK_SAMPLES) for audio in question_16k])
    with torch.no_grad():
        encoded = tiny_loaded.encoder(mels)
    # As a trained encoder's, its output follows the speech, not only the positions: ~15-25 % apart
    # here (with transformers' default init it was ~0.5 %, and nothing trained on it told questions apart).
    for i in range(len(encoded)):
        for j in range(i + 1, len(encoded)):
            assert (encoded[i] - encoded[j]).norm() > 0.1 * encoded[i].norm(), (i, j)
