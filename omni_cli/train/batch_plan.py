"""How the data becomes optimizer steps: the global batch, split over processes and gradient accumulation.

`--batch-size` is the global batch: every process and accumulation step together. Each process
reads its own shard of the shuffled records (DistributedSampler), in micro-batches of at most
`--micro-batch-size`; a resumed run starts mid-epoch where its checkpoint stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from omni_cli.config import FinetuneConfig
from omni_cli.train.distributed import Distributed


@dataclass(frozen=True)
class BatchPlan:
    """The global batch, split over processes and accumulation, and the steps it makes."""

    records: int
    world_size: int
    micro_batch: int  # samples per process per forward/backward
    accumulation: int  # micro-batches per process per optimizer step
    samples_per_process: int  # per epoch: the shard of each process (DistributedSampler pads the shards to one length)
    total_steps: int
    start_step: int  # > 0 when resuming

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together (fewer in a short last step)."""
        return self.world_size * self.micro_batch * self.accumulation

    @property
    def micro_per_epoch(self) -> int:
        """Micro-batches each process runs per epoch."""
        return math.ceil(self.samples_per_process / self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the data."""
        return math.ceil(self.micro_per_epoch / self.accumulation)

    def micro_batches_in(self, step_in_epoch: int) -> int:
        """How many micro-batches each process runs in this step of an epoch (the last one may be short)."""
        return min(self.accumulation, self.micro_per_epoch - step_in_epoch * self.accumulation)

    def describe(self) -> str:
        """One line for the start of a run: what each step really trains on."""
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        steps = f"{self.accumulation} accumulation step{'s' if self.accumulation > 1 else ''}"
        per_epoch = self.samples_per_process * self.world_size
        padded = f" ({per_epoch} with records repeated to fill {processes})" if per_epoch != self.records else ""
        if per_epoch < self.global_batch:
            batch = (f"{self.records} records, fewer than the global batch {self.global_batch}: "
                     f"each step trains on all of them{padded}")
        else:
            batch = f"{self.records} records{padded}, global batch {self.global_batch} = {processes} × {self.micro_batch} samples × {steps}"
            last = per_epoch - (self.steps_per_epoch - 1) * self.global_batch
            if last != self.global_batch:
                batch += f" (the last step of each epoch: {last})"
        resumed = f", resuming after step {self.start_step}" if self.start_step else ""
        total = f"{self.total_steps} step{'s' if self.total_steps != 1 else ''}"
        return f"{batch}; {total} ({self.steps_per_epoch} per epoch){resumed}"


def plan_batches(cfg: FinetuneConfig, records: int, samples_per_process: int, world_size: int, start_step: int) -> BatchPlan:
    """The plan for `records` records, `samples_per_process` of them in each process's shard."""
    micro, accumulation = cfg.batch_split(world_size)
    plan = BatchPlan(records, world_size, micro, accumulation, samples_per_process, 0, start_step)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    return BatchPlan(records, world_size, micro, accumulation, samples_per_process, total, start_step)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start mid-epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, dist_info: Distributed, seed: int) -> None:
        super().__init__(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start
