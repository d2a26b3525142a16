"""How many CPU threads torch may use for the model in chat and transcribe-and-reply.

torch starts one intra-op thread per core. On a small CPU they leave nothing for the audio
callbacks and the screen: on a busy 2-core machine a chat reply with torch's default was spread
over 25 s with 2-3 s silences, and one thread fixed most of it. So the model gets every core but
one, unless the user chose (`--threads`, or OMP_NUM_THREADS, which torch itself reads).

Choosing imports nothing heavy (`omni doctor` and the CLI call it); `use_threads` imports torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen for the model, and why."""

    count: int
    cores: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "default"

    @property
    def description(self) -> str:
        """One line for people, e.g. "1 of 2 cores (one left for audio and the screen)"."""
        if self.source == "default":
            spare = "one left for audio and the screen" if self.cores > 1 else "the only core"
            return f"{self.count} of {self.cores} cores ({spare})"
        return f"{self.count} ({self.source}) of {self.cores} cores"


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def interactive_threads(requested: int | None = None, environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadChoice:
    """The thread count for the model: `requested` (--threads), else OMP_NUM_THREADS when it is a
    positive number, else every available core but one (at least one)."""
    cores = available_cores() if cores is None else cores
    if requested is not None:
        return ThreadChoice(max(1, requested), cores, "--threads")
    env = os.environ if environ is None else environ
    value = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2" (nested levels): the outer one
    if value.isdigit() and int(value) > 0:
        return ThreadChoice(int(value), cores, "OMP_NUM_THREADS")
    return ThreadChoice(max(1, cores - 1), cores, "default")


def use_threads(choice: ThreadChoice) -> None:
    """Make torch's intra-op parallelism use `choice.count` threads (call before the model runs)."""
    import torch

    torch.set_num_threads(choice.count)
