"""Pathwise estimator: backpropagate ``r_w(x0) - alpha * sum_t KL_t`` through the sampling chain.

The noise is reparameterised (drawn per sample, fixed), so the gradient flows through every
state. The KL's gradient is the total derivative: the pretrained prediction at ``x_t`` stays
differentiable in ``x_t`` (its weights are frozen), otherwise the KL can grow without bound.
``truncate_steps=K`` backpropagates through the last K steps only; ``grad_checkpointing``
recomputes each step in the backward pass instead of storing its activations.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task, kl_step, predictions, timestep_tensor
from diffusion_blend.seeding import sample_normals


def pathwise_loss(task: Task, cfg: FinetuneConfig, seeds: list[int]) -> tuple[torch.Tensor, dict]:
    """The negative objective of one batch of trajectories (to minimise) and its statistics."""
    if not task.differentiable:
        raise_non_differentiable()
    pairs = task.schedule.pairs(cfg.sample_steps)
    noise = sample_normals(seeds, (len(pairs) + 1, *task.shape)).to(task.device)
    cond = task.conditioning(seeds)
    x, kl_sum = noise[:, 0], torch.zeros(len(seeds), device=task.device)
    first_tracked = 0 if cfg.truncate_steps is None else len(pairs) - cfg.truncate_steps
    for k, (t, a_t, a_s) in enumerate(pairs):
        with torch.set_grad_enabled(k >= first_tracked):
            frozen = task.freeze_last and k == len(pairs) - 1
            args = (x, noise[:, k + 1], t, a_t, a_s, cond, frozen)
            if cfg.grad_checkpointing and k >= first_tracked:
                x, kl = checkpoint(_step, task, *args, use_reentrant=False)
            else:
                x, kl = _step(task, *args)
        kl_sum = kl_sum + kl
    r = cfg.reward_scale * task.reward(x, **cond)
    if cfg.reward_clip is not None:
        r = r.clamp(-cfg.reward_clip, cfg.reward_clip)
    objective = r - cfg.reward_scale * cfg.alpha * kl_sum
    stats = {"reward": float(r.detach().mean()) / cfg.reward_scale,
             "path_kl": float(kl_sum.detach().mean()),
             "objective": float(objective.detach().mean()) / cfg.reward_scale}
    return -objective.mean(), stats


def _step(task: Task, x, noise, t, a_t, a_s, cond, frozen=False):
    tt = timestep_tensor(t, x.shape[0], x.device)
    out, kl = kl_step(*predictions(task, x, tt, cond, frozen), x, a_t, a_s, noise)
    return out.x, kl


def raise_non_differentiable() -> None:
    from diffusion_blend.errors import UsageError

    raise UsageError("estimator 'pathwise' needs a differentiable reward; this reward is not "
                     "differentiable: use --estimator dpok")
