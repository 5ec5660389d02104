"""When fine-tuning stops: once the objective has stopped improving by more than its noise, after
a short cool-down of the learning rate.

Every ``eval_every`` iterations the objective ``r_w - alpha * path KL`` is measured on one fixed
batch of evaluation trajectories (the same seeds every time, so a change is the policy's, not
the batch's). The run has reached a plateau when the mean of the last ``patience`` evaluations
does not beat the mean of the ``patience`` before them by more than ``z`` standard errors of
their paired difference (per trajectory, same seeds): progress is measured between windows, so
the step-to-step jitter of a policy at a constant learning rate averages out, and against the
noise of the comparison itself, so a slow real climb keeps a run going and a flat one stops.

From the plateau on, the learning rate decays to zero along a half cosine over ``decay`` times
the iterations run so far (at least ``eval_every``), then the run stops: warm-up, constant,
decay, with the decay placed by the problem instead of by a count (the constant phase finds the
basin, the decay averages out the step noise). ``iterations`` stays the budget's upper bound.

``min_progress`` (default 0, off) is a floor on the progress that counts: a window's gain must
also exceed that fraction of the gain since the first evaluation, which ends runs whose policy
keeps changing by amounts the paired comparison resolves but that no longer matter.
"""

from __future__ import annotations

import math

import torch

from diffusion_blend.lr import warmup_lr

NONE = -1   # "no plateau yet" in the checkpointed state


def improved(new: torch.Tensor, old: torch.Tensor, z: float) -> bool:
    """Whether per-trajectory values ``new`` beat ``old`` (same trajectories) on average by more
    than ``z`` standard errors of the paired difference."""
    d = (new.double() - old.double()).reshape(-1)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) > z * se


class Plateau:
    """The stopping rule's state: the last ``2 * patience`` evaluations and, once a plateau was
    found, the iteration it was found at and the length of the decay that follows."""

    def __init__(self, patience: int = 3, z: float = 2.0, decay: float = 1.0,
                 min_decay: int = 1, min_progress: float = 0.0):
        self.patience, self.z, self.decay = int(patience), float(z), float(decay)
        self.min_decay, self.min_progress = int(min_decay), float(min_progress)
        self.window: list[torch.Tensor] = []
        self.found, self.length, self.start = NONE, 0, torch.zeros(0, dtype=torch.float64)

    def update(self, values: torch.Tensor, iteration: int) -> bool:
        """Take the evaluation after ``iteration`` iterations; True when it finds the plateau."""
        p, values = self.patience, values.detach().double().reshape(-1).clone()
        self.start = self.start if self.start.numel() else values
        self.window = (self.window + [values])[-2 * p:]
        flat = len(self.window) == 2 * p and self.flat(torch.stack(self.window[p:]).mean(0),
                                                        torch.stack(self.window[:p]).mean(0))
        if flat and self.found == NONE:
            self.found = iteration
            self.length = max(self.min_decay, math.ceil(self.decay * iteration))
        return flat

    def flat(self, late: torch.Tensor, early: torch.Tensor) -> bool:
        """No progress beyond the paired noise, or (``min_progress``) below the floor."""
        floor = self.min_progress * float(late.mean() - self.start.mean())
        return not improved(late, early, self.z) or float((late - early).mean()) <= floor

    @property
    def decaying(self) -> bool:
        return self.found != NONE

    def lr_factor(self, it: int) -> float:
        """The learning-rate factor of iteration ``it`` (0-based): 1 until the plateau."""
        return warmup_lr(1.0, it - self.found, 0, self.length) if self.decaying else 1.0

    def finished(self, done: int) -> bool:
        """Whether the run is over after ``done`` iterations (the decay has run its course)."""
        return self.decaying and done >= self.found + self.length

    def state_dict(self) -> dict[str, torch.Tensor]:
        window = (torch.stack(self.window) if self.window
                  else torch.zeros(0, 0, dtype=torch.float64))
        return {"window": window, "found": torch.tensor(self.found),
                "length": torch.tensor(self.length), "start": self.start}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.window = [v.double() for v in state["window"]]
        self.found, self.length = int(state["found"]), int(state["length"])
        self.start = state.get("start", torch.zeros(0, dtype=torch.float64)).double()
