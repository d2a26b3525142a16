"""The conversation engine alone: the tiny model, frames a client would send, a sink that plays in real time.

No chat/, no rich, no devices (helpers in conversation_rig.py).
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def vocoder(tiny_model):
    from omni_cli.model.vocoder_loading import load_vocoder

    return load_vocoder(tiny_model.vocoder_dir)


@pytest.fixture
def make_replies(tiny_loaded, vocoder):
    """The tiny model with its vocoder, `tokens` tokens a reply (25 tokens are about 1 s of speech, made in ~0.1 s), small chunks."""
    from omni_cli.config import SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech

    def make(tokens: int = 40):
        sampling = SamplingConfig(max_new_tokens=tokens, ignore_stop=True)
        return SpeechToSpeech(tiny_loaded, vocoder, StreamingConfig(sampling=sampling, chunk_units=10, first_chunk_units=5))

    return make


@pytest.fixture
def question(question_16k: list[np.ndarray]) -> np.ndarray:
    """A real spoken question at 16 kHz (tests/data, 22.05 kHz on disk)."""
    return question_16k[0]
