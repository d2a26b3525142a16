"""Run the `omni` command in this process and write down what it cost, for the GPU suite.

`python tests/gpu/omni_probe.py ARGS...` is `omni ARGS...`: it calls `omni_cli.cli.main`, the
function behind the console script, so options, output and exit status are the real command's.
At exit it writes one JSON object to $OMNI_PROBE_OUT: the wall time and the peak memory
(the CUDA allocator's peak where CUDA was used, the process's peak RSS always).

Rehearsal only (OMNI_PROBE_CPU_QUANT=1): omni sends `--precision 8bit/4bit` (and so `--qlora`)
to a CUDA GPU; bitsandbytes >= 0.50 runs them on a CPU too, so the rehearsal lets them through
with the compute dtype they get on CUDA, as tests/model/test_loading.py does in-process.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = time.perf_counter()


def _write_figures(path: Path) -> None:
    figures: dict[str, float | int | None] = {
        "wall_s": round(time.perf_counter() - START, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_allocated_bytes": None,
        "cuda_peak_reserved_bytes": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        figures["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        figures["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    path.write_text(json.dumps(figures) + "\n")


def _let_quantization_run_on_the_cpu() -> None:
    import torch

    import omni_cli.pipeline
    from omni_cli.model import loading

    real = loading.resolve_placement

    def placement(precision: str = "auto", device: str | None = None) -> loading.Placement:
        if precision in ("8bit", "4bit"):
            return loading.Placement(torch.device("cpu"), torch.float16, precision)
        return real(precision, device)

    # Both modules look the name up at call time; pipeline imported it by name.
    loading.resolve_placement = placement
    omni_cli.pipeline.resolve_placement = placement


def main() -> None:
    """`omni` with the probe's bookkeeping around it."""
    sys.path.insert(0, str(ROOT))
    out = os.environ.get("OMNI_PROBE_OUT")
    if out:
        atexit.register(_write_figures, Path(out))
    if os.environ.get("OMNI_PROBE_CPU_QUANT") == "1":
        _let_quantization_run_on_the_cpu()
    from omni_cli.cli import main as omni

    sys.argv[0] = "omni"
    omni()


if __name__ == "__main__":
    main()
