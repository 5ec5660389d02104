"""Sample statistics used by every report: means with standard errors, sample distances."""

from __future__ import annotations

import torch


def mean_and_stderr(values: torch.Tensor,
                    strata: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-column mean and standard error of the mean of ``values`` ([n, k]).

    ``strata`` ([n]): each row's stratum where the design fixes it (a class or prompt per seed,
    ``s % n``), so only the spread within strata is sampling error:
    ``se^2 = sum_h n_h s_h^2 / n^2``. Rows are taken as iid when it is None or a stratum has
    fewer than two rows (its spread is then unknown)."""
    values = values.double()
    n = values.shape[0]
    if strata is not None and n and torch.unique(strata, return_counts=True)[1].min() > 1:
        sq = sum(len(v) * v.var(0) for v in _groups(values, strata))
        return values.mean(0).tolist(), (sq.sqrt() / n).tolist()
    std = values.std(0, unbiased=True) if n > 1 and values.numel() else torch.zeros(
        values.shape[1:])
    return values.mean(0).tolist(), (std / n**0.5).tolist()


def _groups(values: torch.Tensor, strata: torch.Tensor) -> list[torch.Tensor]:
    return [values[strata == h] for h in torch.unique(strata)]


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
