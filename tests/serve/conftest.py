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
    """The tiny model loaded as `omni serve` loads it (fp32, CPU, the serve defaults), for expected replies.
    Its random weights never say they are done: every reply runs to its token limit."""
    return _load_as_served(tiny_model)


# A tiny random model whose replies end by themselves (the end-of-turn token after 7-10 tokens) on the
# spoken questions and short typed ones: response.done says "completed" as for a real model.
STOPPING_SEED = 11


@pytest.fixture(scope="package")
def stopping_pipeline(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model (seed STOPPING_SEED) loaded as `omni serve` loads it, whose replies stop on their own."""
    from omni_cli.tiny.omni import make_tiny_model

    return _load_as_served(make_tiny_model(tmp_path_factory.mktemp("tiny-stopping"), seed=STOPPING_SEED))


def _load_as_served(model):
    from omni_cli.cli.shared import streaming_config
    from omni_cli.config import CHAT_FIRST_CHUNK_UNITS, SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech
    from omni_cli.weights.model_files import read_model_files

    defaults, sampling = StreamingConfig(), SamplingConfig()
    streaming = streaming_config(sampling.max_new_tokens, sampling.temperature, defaults.chunk_units, CHAT_FIRST_CHUNK_UNITS,
                                 defaults.decode_steps, defaults.context_budget)
    files = read_model_files(model.model_dir, model.speech_encoder, model.vocoder_dir)
    return SpeechToSpeech.load(files, "fp32", "cpu", streaming)
