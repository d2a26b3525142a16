"""The serve tests import their servers from servers.py; the `tiny_server` and `tiny_pipeline` fixtures are in
tests/conftest.py, shared with tests/research (its LLM steps talk to the same real `omni serve`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from servers import load_as_served  # noqa: E402

from omni_cli.tiny.omni import TinyModelPaths  # noqa: E402


@pytest.fixture(scope="package")
def stopping_pipeline(tmp_path_factory: pytest.TempPathFactory, question_16k):
    """A tiny model loaded as `omni serve` loads it whose replies end by themselves after a few tokens, as a
    real model's do (`response.done` says "completed"); see `stopping_model`."""
    return load_as_served(stopping_model(tmp_path_factory.mktemp("tiny-stopping"), question_16k))


def stopping_model(folder: Path, questions: list) -> TinyModelPaths:
    """The tiny model (seed 0) with one more stop token in its generation config.

    A random model almost never picks `<|eot_id|>`, and which seeds happen to stop changes whenever the
    tiny weights do. Greedy replies of a random model fall into the same few tokens whatever the prompt,
    so the token that every reply to the probes (typed text and the spoken questions, bare and padded
    with silence as a client sends them) says soonest, from the 4th on, ends them all within a few tokens.
    """
    import json

    import numpy as np
    import torch

    from omni_cli.config import SamplingConfig
    from omni_cli.model.llm import generate
    from omni_cli.tiny.omni import make_tiny_model

    model = make_tiny_model(folder, seed=0)
    pipeline = load_as_served(model)
    silence = np.zeros(16000, np.float32)
    probes = ["hi", "Hello there", *questions, *(np.concatenate([silence[:4800], q, silence]) for q in questions)]
    first_seen: list[dict[int, int]] = []
    for probe in probes:
        embeds, _ = pipeline.prompt_embeds(probe)
        with torch.inference_mode():
            tokens = generate(pipeline.model.llm, embeds, set(), SamplingConfig(max_new_tokens=24, ignore_stop=True), steps=pipeline.llm_steps)
            said = [t.token_id for t in tokens]
        first_seen.append({token: said.index(token) for token in reversed(said)})
    common = set.intersection(*(set(seen) for seen in first_seen))
    stop = min((t for t in common if all(seen[t] >= 3 for seen in first_seen)), key=lambda t: max(seen[t] for seen in first_seen))
    config_path = model.model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [*config["eos_token_id"], stop]
    config_path.write_text(json.dumps(config))
    return model
