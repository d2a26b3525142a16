"""Fixtures of the serve tests: one `omni serve` subprocess on the tiny model for the whole module, and the tiny pipeline."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import RunningServer, omni_serve  # noqa: E402


@pytest.fixture(scope="package")
def tiny_server(tiny_model) -> Iterator[RunningServer]:
    """A real `omni serve` (tiny model, CPU, no key), shared by the tests that only talk to it."""
    with omni_serve(tiny_model) as server:
        yield server


@pytest.fixture(scope="package")
def tiny_pipeline(tiny_model):
    """The tiny model loaded as `omni serve` loads it (fp32, CPU, the serve defaults), for expected replies."""
    from omni_cli.cli.shared import streaming_config
    from omni_cli.config import CHAT_FIRST_CHUNK_UNITS, SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech
    from omni_cli.weights.model_files import read_model_files

    defaults, sampling = StreamingConfig(), SamplingConfig()
    streaming = streaming_config(sampling.max_new_tokens, sampling.temperature, defaults.chunk_units, CHAT_FIRST_CHUNK_UNITS,
                                 defaults.decode_steps, defaults.context_budget)
    files = read_model_files(tiny_model.model_dir, tiny_model.speech_encoder, tiny_model.vocoder_dir)
    return SpeechToSpeech.load(files, "fp32", "cpu", streaming)
