"""`omni doctor` on the GPU machine: OK for the GPU, bitsandbytes and the memory the model needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_rig import Rig


@pytest.mark.parametrize("precision", ["auto", pytest.param("4bit", marks=pytest.mark.slow)])
def test_doctor_says_ok_for_what_fits(rig: Rig, precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Empty caches: the weights are reported missing the same way everywhere.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    ran = rig.omni("doctor", "--precision", precision)
    assert ran.returncode == 0, ran.explain()
    status = {line.split(" — ")[0].split(maxsplit=1)[1]: line.split()[0] for line in ran.stdout.splitlines() if " — " in line}
    assert "FIX" not in status.values(), ran.stdout
    assert status["python"] == status["torch"] == status["transformers"] == "OK", ran.stdout
    if rig.device == "cuda":
        # An H100/H200 holds llama-omni-8b at any precision; bitsandbytes imports with its CUDA library.
        assert (status["CUDA GPU"], status["GPU memory"], status["bitsandbytes"]) == ("OK", "OK", "OK"), ran.stdout
    else:
        assert (status["CUDA GPU"], status["bitsandbytes"]) == ("MISSING", "WARN"), ran.stdout
    rig.record(f"doctor[{precision}]", lines=ran.stdout.splitlines(), command_wall_s=ran.figures.get("wall_s"))
