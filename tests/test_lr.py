"""The shared learning-rate schedule against its definition."""

import math

from diffusion_blend.lr import warmup_lr


def test_warm_up_then_cosine_to_zero_or_constant():
    lr, warmup, total = 3e-3, 10, 110
    assert warmup_lr(lr, 0, warmup, total) == lr / warmup        # no step wasted at zero
    assert warmup_lr(lr, warmup - 1, warmup, total) == lr
    assert warmup_lr(lr, warmup, warmup, total) == lr           # the cosine starts at the top
    mid = warmup_lr(lr, warmup + 50, warmup, total)
    assert math.isclose(mid, lr / 2)                             # half-way down the half cosine
    assert warmup_lr(lr, total - 1, warmup, total) < lr * 1e-3
    assert warmup_lr(lr, total - 1, warmup, total, cosine=False) == lr
    assert warmup_lr(lr, 0, 0, total) == lr                      # no warm-up
