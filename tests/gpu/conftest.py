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


def xdist_group(item: pytest.Item) -> str:
    """Which worker group a case runs in under `pytest -n N --dist loadgroup`: the cases that share
    a session's replies (see Replies) stay together, so no command runs twice."""
    module = item.path.stem.removeprefix("test_gpu_")
    if module != "replies":
        return module
    if "mid" in item.name:
        return "mid"
    # The step modes run beside the precisions (compiling is the longest case): their eager
    # reference reply is made in both groups.
    return "tiny-steps" if "step_modes" in item.name else "tiny"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests `gpu`, skip them without CUDA (unless rehearsing), compiled cases last."""
    if DEVICE not in ("cuda", "cpu"):
        raise pytest.UsageError(f"OMNI_TEST_DEVICE={DEVICE!r}: use cuda (default) or cpu (rehearsal)")
    ours = [item for item in items if HERE in item.path.parents]
    skip = pytest.mark.skip(reason=NO_CUDA_REASON) if CUDA and not torch.cuda.is_available() else None
    # On the device the suite runs in five processes at once (gpu_session.sh: pytest -n 5 --dist loadgroup).
    grouped = config.pluginmanager.hasplugin("xdist")
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)
        if grouped:
            item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
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
    # Under pytest-xdist every worker writes this line: its timings share the GPU with the others'.
    rig.record("environment", python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               rehearsal=DEVICE == "cpu", worker=os.environ.get("PYTEST_XDIST_WORKER"), **versions)
    return rig


@pytest.fixture(scope="session")
def models(tiny_model, rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> RandomModels:
    """The tiny model (tests/conftest.py's) and the mid-size one, written when first asked for."""
    tiny = RandomModel(tiny_model.model_dir, tiny_model.speech_encoder, tiny_model.vocoder_dir)
    return RandomModels(rig, tiny, tmp_path_factory.mktemp("mid"))


@pytest.fixture(scope="session")
def replies(rig: Rig, models: RandomModels) -> Replies:
    """The session's replies, made on first use."""
    return Replies(rig, models)
