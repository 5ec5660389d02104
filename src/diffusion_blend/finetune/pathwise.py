"""Pathwise estimator: backpropagate ``r_w(x0) - alpha * sum_t KL_t`` through the sampling chain.

The noise is reparameterised (drawn per sample, fixed), so the gradient flows through every
state. The KL's gradient is the total derivative: the pretrained prediction at ``x_t`` stays
differentiable in ``x_t`` (its weights are frozen), otherwise the KL can grow without bound.
``truncate_steps=K`` backpropagates through the last K steps only; ``grad_checkpointing``
recomputes each step in the backward pass instead of storing its activations.
"""

from __future__ import annotations

import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task, run_chain, scaled_reward


def pathwise_loss(task: Task, cfg: FinetuneConfig, seeds: list[int]) -> tuple[torch.Tensor, dict]:
    """The negative objective of one batch of trajectories (to minimise) and its statistics."""
    if not task.differentiable:
        raise UsageError("estimator 'pathwise' needs a differentiable reward; this reward is "
                         "not differentiable: use --estimator dpok")
    steps = len(task.schedule.transitions(cfg.sample_steps))
    tracked_from = 0 if cfg.truncate_steps is None else steps - cfg.truncate_steps
    x, kl_sum, cond = run_chain(task, seeds, cfg.sample_steps, tracked_from,
                                cfg.grad_checkpointing)
    r = scaled_reward(task, cfg, x, cond)
    objective = r - cfg.reward_scale * cfg.alpha * kl_sum
    stats = {"reward": float(r.detach().mean()) / cfg.reward_scale,
             "path_kl": float(kl_sum.detach().mean()),
             "objective": float(objective.detach().mean()) / cfg.reward_scale}
    return -objective.mean(), stats
