"""The learning-rate schedule every training loop shares (the base recipe, fine-tuning).

Linear warm-up reaching ``lr / warmup`` at the first step (diffusers' and transformers'
helpers start at 0, a step wasted with no update; the shipped weights were made with this
one), then constant or a half cosine to zero at the last step.
"""

from __future__ import annotations

import math


def warmup_lr(lr: float, it: int, warmup: int, total: int, cosine: bool = True) -> float:
    """The learning rate of step ``it`` (0-based) of ``total``."""
    if it < warmup:
        return lr * (it + 1) / warmup
    if not cosine:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))
