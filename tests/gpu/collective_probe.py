"""One all-reduce through torch.distributed under torchrun: the backend starts, sums, and shuts down.

    torchrun --nproc_per_node 1 tests/gpu/collective_probe.py nccl    # gloo on a CPU

Prints one JSON object (rank 0). omni's trainer joins a process group only when torchrun starts
two or more processes, so on a one-GPU machine this probe is what exercises NCCL.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    """Join the torchrun job with the backend named on the command line and sum one tensor over it."""
    backend = sys.argv[1]
    dist.init_process_group(backend=backend)  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    summed = torch.full((1 << 20,), float(rank + 1), device=device)
    dist.all_reduce(summed)
    dist.barrier()
    if rank == 0:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None
        print(json.dumps({"backend": dist.get_backend(), "world_size": world, "sum": float(summed[0]),
                          "expected": world * (world + 1) / 2, "nccl": nccl}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
