"""Several processes (``accelerate launch``) share the work: a fine-tuning iteration's batch
of trajectories, a sweep's rows, a sample's seeds.

Rank r takes every world-th item (``shard``), so the whole, and hence the result, does not
depend on the number of processes: gradients are averaged across ranks after each backward
pass, sampled rows are gathered back into seed order (``gather``). One process is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


class Dist:
    """The process group set up by ``accelerate launch`` (or none)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            from accelerate import PartialState

            PartialState()  # initialises torch.distributed from the launcher's environment

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's accelerator (``LOCAL_RANK``) when several processes share one, else CPU."""
        accelerator = torch.accelerator.current_accelerator()
        if self.world > 1 and accelerator is not None:
            return torch.device(accelerator.type, int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def shard(self, seeds: Sequence[int]) -> list[int]:
        return list(seeds[self.rank::self.world])

    def sync_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over ranks (after ``backward``, before the optimizer step)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t) / self.world

    def barrier(self) -> None:
        """Wait for every rank (between a sweep's phases, around what rank 0 writes)."""
        if self.world > 1:
            dist.barrier()

    def gather(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` rows of which this rank holds ``shard(range(n))``, on every rank, in
        order (the inverse of ``shard``; rows are padded to one length for the collective)."""
        if self.world == 1:
            return part
        size = -(-n // self.world)
        pad = part.new_zeros((size - len(part), *part.shape[1:]))
        parts = [part.new_empty((size, *part.shape[1:])) for _ in range(self.world)]
        dist.all_gather(parts, torch.cat([part, pad]))
        out = part.new_empty((n, *part.shape[1:]))
        for r, rows in enumerate(parts):
            out[r::self.world] = rows[:len(range(r, n, self.world))]
        return out
