"""Shared test set-up: never touch the network, keep torch small on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

# Three of the real questions from ../shared/data/questions are copied here so a clean
# clone can test on real speech without the shared folder.
QUESTIONS_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def question_wavs() -> list[Path]:
    """The real spoken questions shipped beside the repository (22.05 kHz float WAVs)."""
    wavs = sorted(QUESTIONS_DIR.glob("helpful_base_*.wav"))
    assert wavs, f"question WAVs missing under {QUESTIONS_DIR}"
    return wavs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random LLaMA-Omni written once per run in the released layout (see omni_cli/tiny)."""
    from omni_cli.tiny.omni import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny model loaded through the users' code path, on CPU in fp32."""
    from omni_cli.model.loading import load_omni

    return load_omni(tiny_model.model_dir, tiny_model.speech_encoder, precision="fp32", device="cpu")
