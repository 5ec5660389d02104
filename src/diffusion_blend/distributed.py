"""Several processes (``accelerate launch``) share each iteration's batch of trajectories.

Rank r takes every world-th seed of the iteration's seeds, so the global batch, and hence the
run, does not depend on the number of processes; gradients are averaged across ranks after
each backward pass. One process (what the tests run) is a no-op.
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
        if self.world > 1 and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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
