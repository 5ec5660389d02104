"""Rewards: a small protocol and a registry by name. Rewards do not know who calls them.

A reward maps a batch of clean samples (and the conditioning, e.g. class labels ``y``) to one
score per sample. ``differentiable`` says whether pathwise fine-tuning and reward-gradient
guidance may backpropagate through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from diffusion_blend.errors import UsageError


@runtime_checkable
class Reward(Protocol):
    name: str
    differentiable: bool

    def __call__(self, x0: torch.Tensor, **cond) -> torch.Tensor: ...


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Decorator: make a reward factory available as ``get_reward(name, ...)``."""
    def deco(factory):
        REGISTRY[name] = factory
        return factory
    return deco


BUILTIN = ("diffusion_blend.rewards.grey", "diffusion_blend.rewards.images",
           "diffusion_blend.rewards.imagereward", "diffusion_blend.rewards.hpsv2")


def get_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name``; unknown names list the known ones."""
    import importlib
    import inspect

    for module in BUILTIN:   # registering is cheap: heavy models load only when built
        importlib.import_module(module)
    if name not in REGISTRY:
        raise UsageError(f"reward {name!r} is not known; known rewards: {sorted(REGISTRY)}")
    factory = REGISTRY[name]
    allowed = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UsageError(f"reward {name!r} takes no argument {unknown[0]!r}; it takes "
                         f"{', '.join(allowed) or 'none'}")
    return factory(**kwargs)


class WeightedSum:
    """``r_w = sum_i w_i r_i``: the reward a preference ``w`` targets."""

    def __init__(self, rewards: list[Reward], w: list[float]):
        if len(rewards) != len(w):
            raise UsageError(f"w has {len(w)} weights {list(w)} but there are {len(rewards)} "
                             "rewards")
        self.rewards, self.w = rewards, [float(v) for v in w]
        self.name = "+".join(f"{wi:g}*{r.name}" for wi, r in zip(self.w, rewards, strict=True))
        self.differentiable = all(r.differentiable for r in rewards)

    def __call__(self, x0: torch.Tensor, **cond) -> torch.Tensor:
        out = None
        for wi, r in zip(self.w, self.rewards, strict=True):
            if wi != 0.0:
                v = wi * r(x0, **cond)
                out = v if out is None else out + v
        return out if out is not None else torch.zeros(x0.shape[0], device=x0.device)
