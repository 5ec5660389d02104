"""When fine-tuning stops: when the objective has stopped improving by more than its noise.

Every ``eval_every`` iterations the objective ``r_w - alpha * path KL`` is measured on one fixed
batch of evaluation trajectories (the same seeds every time, so a change is the policy's, not
the batch's). An evaluation counts as progress when it beats the best one so far by more than
``z`` standard errors of the objective's estimate: improvements the evaluation cannot resolve do
not keep a run going (a steady creep still does once it adds up to that much within the
window). The run stops after ``patience`` evaluations in a row without progress;
``iterations`` stays the budget's upper bound. More ``stop_trajectories`` resolve finer gains.
"""

from __future__ import annotations

import math

import torch


def improved(new: torch.Tensor, best: torch.Tensor, z: float) -> bool:
    """Whether the per-trajectory values ``new`` beat ``best`` on average by more than ``z``
    standard errors of the new estimate (``std / sqrt(n)``)."""
    new = new.double().reshape(-1)
    se = float(new.std() / math.sqrt(len(new))) if len(new) > 1 else 0.0
    return float(new.mean() - best.double().mean()) > z * se


class Plateau:
    """The stopping rule's state: the best evaluation's per-trajectory objective and how many
    evaluations in a row have not beaten it."""

    def __init__(self, patience: int = 3, z: float = 2.0):
        self.patience, self.z = int(patience), float(z)
        self.best: torch.Tensor | None = None
        self.since, self.stopped = 0, False

    def update(self, values: torch.Tensor) -> bool:
        """Take one evaluation; True when the run should stop."""
        if self.best is None or improved(values, self.best, self.z):
            self.best, self.since = values.detach().double().clone(), 0
        else:
            self.since += 1
        self.stopped = self.since >= self.patience
        return self.stopped

    def state_dict(self) -> dict[str, torch.Tensor]:
        best = self.best if self.best is not None else torch.zeros(0, dtype=torch.float64)
        return {"best": best, "since": torch.tensor(self.since),
                "stopped": torch.tensor(int(self.stopped))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.best = state["best"].double() if state["best"].numel() else None
        self.since, self.stopped = int(state["since"]), bool(int(state["stopped"]))
