"""This process's place in a torchrun job, and the sums over its processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world 1 when run alone)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and reports progress."""
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Join the torchrun job described by the environment (gloo on CPU, nccl on CUDA), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(0, 0, 1)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(rank, local_rank, world)


class Collectives:
    """Sums over the processes of a torchrun job (the value itself when run alone), then leaving the job.

    The only tensors handed to collectives are this object's buffers, one per name, reused every
    step and kept until the process group is destroyed. A gloo worker thread that drops the last
    reference to a tensor whose Python object has died must take the GIL to free that object; if
    the main thread is then destroying the group (holding the GIL while it joins those threads),
    both wait forever. A tensor Python still holds is let go without the GIL (see `leave`).
    """

    def __init__(self, world_size: int = 1, device: torch.device | None = None) -> None:
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self._buffers: dict[str, torch.Tensor] = {}

    def sum(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the processes, through this object's buffer `name`."""
        if self.world_size == 1:
            return value
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty_like(value)
        buffer.copy_(value)
        dist.all_reduce(buffer)
        return buffer.clone()

    def any(self, name: str, flag: bool) -> bool:
        """Whether `flag` is set on any process."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(name, torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)

    def leave(self) -> None:
        """Destroy the process group (if this process joined one), and only then let go of the buffers."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self._buffers.clear()
