"""Rewards on grey images ``1 x S x S`` in [-1, 1] (digits, fashion; pixel intensity
``p = (x + 1) / 2`` in [0, 1]).

All are differentiable torch functions. Raw ranges are below; each reward can be normalised by
the pretrained model's standard deviation (``scale``) so that one alpha moves every expert a
similar distance.

- ``class``: logit margin of the prompted digit under the reward classifier,
  ``logit_y - max_{j != y} logit_j`` (unbounded; not saturated like the log-probability).
- ``class-logprob``: ``log p(y | x0)`` under the reward classifier, in (-inf, 0]: a consistent
  target (its gradient raises the prompted class's probability, whichever class competes),
  where the margin's gradient switches between competitors from sample to sample.
- ``ink``: mean intensity, in [0, 1] (bold strokes).
- ``crisp``: mean ``|2p - 1|``, in [0, 1] (pixels close to 0 or 1).
- ``symmetry``: ``-mean |p - mirror(p)|`` left-right, in [-1, 0].
- ``smooth``: ``-mean |p_i - p_j|`` over horizontally and vertically adjacent pixels, in
  [-1, 0] (soft, blurred strokes; conflicts with ``ink`` and ``crisp``).
"""

from __future__ import annotations

import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.rewards import register


def _intensity(x0: torch.Tensor) -> torch.Tensor:
    return ((x0.clamp(-1.5, 1.5) + 1.0) / 2.0).flatten(1)


class GreyReward:
    """A named differentiable reward with an affine normalisation ``(r - shift) / scale``."""

    differentiable = True

    def __init__(self, name: str, fn, scale: float = 1.0, shift: float = 0.0):
        if not scale > 0:
            raise UsageError(f"reward {name!r}: scale={scale} must be > 0")
        self.name, self.fn, self.scale, self.shift = name, fn, float(scale), float(shift)

    def raw(self, x0: torch.Tensor, **cond) -> torch.Tensor:
        return self.fn(x0, **cond)

    def __call__(self, x0: torch.Tensor, **cond) -> torch.Tensor:
        return (self.fn(x0, **cond) - self.shift) / self.scale


def ink(x0: torch.Tensor, **_) -> torch.Tensor:
    return _intensity(x0).mean(1)


def crisp(x0: torch.Tensor, **_) -> torch.Tensor:
    return (2 * _intensity(x0) - 1).abs().mean(1)


def symmetry(x0: torch.Tensor, **_) -> torch.Tensor:
    p = (x0.clamp(-1.5, 1.5) + 1.0) / 2.0
    return -(p - p.flip(-1)).abs().flatten(1).mean(1)


def smooth(x0: torch.Tensor, **_) -> torch.Tensor:
    p = (x0.clamp(-1.5, 1.5) + 1.0) / 2.0
    dy = (p[..., 1:, :] - p[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (p[..., :, 1:] - p[..., :, :-1]).abs().flatten(1).mean(1)
    return -(dx + dy) / 2


def _logits_and_class(classifier, x0: torch.Tensor, y, name: str):
    if y is None:
        raise UsageError(f"reward {name!r} needs the prompted class y")
    logits = classifier(x0.float())
    return logits, torch.as_tensor(y, device=x0.device).long().reshape(-1).expand(x0.shape[0])


def class_logprob(classifier):
    def fn(x0: torch.Tensor, y=None, **_) -> torch.Tensor:
        logits, y = _logits_and_class(classifier, x0, y, "class-logprob")
        return torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
    return fn


def class_margin(classifier):
    def fn(x0: torch.Tensor, y=None, **_) -> torch.Tensor:
        logits, y = _logits_and_class(classifier, x0, y, "class")
        own = logits.gather(1, y[:, None])[:, 0]
        own_mask = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
        others = logits.masked_fill(own_mask, float("-inf"))
        return own - others.max(1).values
    return fn


def _register_pixel_reward(name: str, fn) -> None:
    """``name`` in the registry: a reward of the pixels alone, with its normalisation."""
    def make(scale: float = 1.0, shift: float = 0.0) -> GreyReward:
        return GreyReward(name, fn, scale, shift)
    register(name)(make)


for _name, _fn in (("ink", ink), ("crisp", crisp), ("symmetry", symmetry), ("smooth", smooth)):
    _register_pixel_reward(_name, _fn)


def _register_class_reward(name: str, fn) -> None:
    """``name`` in the registry: a reward of the reward classifier's view of the prompt."""
    def make(classifier=None, scale: float = 1.0, shift: float = 0.0) -> GreyReward:
        if classifier is None:
            raise UsageError(f"the {name!r} reward needs classifier= (the domain's reward "
                             "classifier, e.g. diffusion_blend.domains.images."
                             "load_classifier(SPEC))")
        return GreyReward(name, fn(classifier), scale, shift)
    register(name)(make)


_register_class_reward("class", class_margin)
_register_class_reward("class-logprob", class_logprob)

