"""How close a fine-tuned model is to the best any model can reach, on any domain.

For a reward ``r`` and KL strength ``alpha``, the objective ``J = E[r(x0)] - alpha * path KL``
is at most ``alpha * log Z`` with ``Z = E_pre[exp(r(x0) / alpha)]`` (Gibbs variational principle
over paths), reached by the pretrained chain tilted by ``exp(r / alpha)``. ``log Z`` is
estimated by the SMC sampler with the model itself as the proposal, weighted by the reward at
the end only (importance sampling of the paths: a fine-tuned model is near the target, and a
reward of ``x0_hat`` at high noise is a poor intermediate potential; unbiased in ``Z``, its
standard error from the spread over independent runs), and the model's *gain ratio* is
``(J - J_pre) / (alpha log Z - J_pre)`` with ``J_pre = E_pre[r]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusion_blend.blend import Denoiser
from diffusion_blend.domains.base import Domain
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range
from diffusion_blend.smc import log_z_stderr, smc_sample

Reward = Callable[..., torch.Tensor]


def objective(domain: Domain, model: Denoiser, reward: Reward, alpha: float,
              seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trajectory's reward and path KL to the pretrained chain (``model`` sampled)."""
    cond = domain.cond(seeds)
    res = sample(model, domain.schedule, seeds, domain.shape, domain.steps, cond=cond,
                 reference=domain.base)
    with torch.no_grad():
        return reward(res.x0, **cond).double(), res.kls.sum(0).double()


def log_z(domain: Domain, proposal: Denoiser, reward: Reward, alpha: float, runs: list[int],
          particles: int) -> tuple[float, float]:
    """SMC estimate of ``log E_pre[exp(r / alpha)]`` and its standard error (delta method over
    the runs' unbiased ``Z`` estimates)."""
    res = smc_sample(proposal, domain.base, lambda x0, **c: reward(x0, **c).double() / alpha,
                     domain.schedule, runs, domain.shape, domain.steps, particles,
                     cond=domain.cond(runs), twist=False)
    return res.log_z_estimate(), log_z_stderr(res.log_z)


def gain_ratio(domain: Domain, model: Denoiser, reward: Reward, alpha: float, n: int = 512,
               runs: int = 64, particles: int = 16, seed: int = 0) -> dict:
    """The model's objective, the pretrained one, the SMC optimum and the gain ratio, each with
    its standard error (the model and the pretrained chain on the same seeds)."""
    seeds = seed_range(seed, n)
    r, kl = objective(domain, model, reward, alpha, seeds)
    r_pre, _ = objective(domain, domain.base, reward, alpha, seeds)
    (j, j_pre, gain), (j_se, j_pre_se, gain_se) = mean_and_stderr(
        torch.stack([r - alpha * kl, r_pre, r - alpha * kl - r_pre], 1))
    lz, lz_se = log_z(domain, model, reward, alpha, seed_range(seed + n, runs), particles)
    room = alpha * lz - j_pre
    ratio = gain / room
    ratio_se = abs(ratio) * math.hypot(gain_se / gain if gain else 0.0,
                                       math.hypot(alpha * lz_se, j_pre_se) / room)
    return {"objective": j, "objective_se": j_se, "pretrained_objective": j_pre,
            "path_kl": float(kl.mean()), "log_z": lz, "log_z_se": lz_se,
            "optimum": alpha * lz, "gain_ratio": ratio, "gain_ratio_se": ratio_se}
