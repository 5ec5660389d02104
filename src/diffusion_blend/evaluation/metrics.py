"""Sample statistics used by every report: means with standard errors, sample distances."""

from __future__ import annotations

import torch


def mean_and_stderr(values: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-column mean and standard error of the mean of ``values`` ([n, k])."""
    values = values.double()
    n = values.shape[0]
    std = values.std(0, unbiased=True) if n > 1 and values.numel() else torch.zeros(
        values.shape[1:])
    return values.mean(0).tolist(), (std / n**0.5).tolist()


def energy_distance(x: torch.Tensor, y: torch.Tensor, max_points: int = 4000) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (unbiased within-sample terms).

    Zero iff the two laws are equal; at most ``max_points`` of each sample are used (the first
    ones, so the result is deterministic).
    """
    x, y = x[:max_points].double(), y[:max_points].double()
    xy = torch.cdist(x, y).mean()
    return float(2 * xy - _within(x) - _within(y))


def _within(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.cdist(x, x).sum() / (n * (n - 1))
