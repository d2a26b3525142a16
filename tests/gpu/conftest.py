"""The GPU suite's hooks and fixtures (helpers in gpu_rig.py, which says how the suite runs).

Every test in this folder is marked `gpu`. By default the suite runs on CUDA and is skipped,
with the reason, where no CUDA GPU is visible; `OMNI_TEST_DEVICE=cpu` rehearses it on the CPU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

from gpu_rig import CUDA, DEVICE, HERE, NO_CUDA_REASON, RandomModel, RandomModels, Replies, Rig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests `gpu`, skip them without CUDA (unless rehearsing), compiled cases last."""
    if DEVICE not in ("cuda", "cpu"):
        raise pytest.UsageError(f"OMNI_TEST_DEVICE={DEVICE!r}: use cuda (default) or cpu (rehearsal)")
    ours = [item for item in items if HERE in item.path.parents]
    skip = pytest.mark.skip(reason=NO_CUDA_REASON) if CUDA and not torch.cuda.is_available() else None
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
    # torch.compile is the slowest part: if the device call runs out of time, it is what is cut.
    items.sort(key=lambda item: item in ours and "compiled" in item.name)


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """The device and the figures file; the first line says what ran where."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rig = Rig(DEVICE, tmp_path_factory.mktemp("gpu-suite"), out)
    versions = {}
    for name in ("transformers", "bitsandbytes", "peft", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is a figure too
            versions[name] = f"not importable ({type(exc).__name__})"
    rig.record("environment", python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               rehearsal=DEVICE == "cpu", **versions)
    return rig


@pytest.fixture(scope="session")
def models(tiny_model, rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> RandomModels:
    """The tiny model (tests/conftest.py's) and the mid-size one, written when first asked for."""
    tiny = RandomModel("tiny", tiny_model.model_dir, tiny_model.speech_encoder, tiny_model.vocoder_dir)
    return RandomModels(rig, tiny, tmp_path_factory.mktemp("mid"))


@pytest.fixture(scope="session")
def replies(rig: Rig, models: RandomModels) -> Replies:
    """The session's replies, made on first use."""
    return Replies(rig, models)
