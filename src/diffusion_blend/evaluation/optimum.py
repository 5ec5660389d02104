"""How close a fine-tuned model is to the best any model can reach, on any domain.

For a reward ``r`` and KL strength ``alpha``, the objective ``J = E[r(x0)] - alpha * path KL``
is at most ``alpha * log Z`` with ``Z = E_pre[exp(r(x0) / alpha)]`` (Gibbs variational principle
over paths), reached by the pretrained chain tilted by ``exp(r / alpha)``. A conditional model
(a prompt ``c`` that the user draws, not the model) meets the bound once per prompt, so its
optimum is ``E_c[alpha log Z_c]``, ``Z_c = E_pre[exp(r / alpha) | c]``: by Jensen below
``alpha log E_c[Z_c]``, which only a model that also tilts the prompts' law could reach (on the
digits the two differ by 0.3-0.6 in normalised reward units).

``log Z_c`` is estimated by the SMC sampler with the model itself as the proposal, weighted by
the reward at the end only and never resampled: plain importance sampling of the paths. A
fine-tuned model is near the target; a reward of ``x0_hat`` at high noise is a poor intermediate
potential (twisted SMC), and resampling on the path ratio alone pulls the particles back toward
the untilted chain (on the digits both gave ``log Z`` estimates below the one-particle bound
``E[log w]``). The estimate is unbiased in ``Z_c``, its standard error from the spread over
independent runs; ``log`` of it is biased low by about half its squared relative error, so a
gain ratio errs, if at all, upward. The model's *gain ratio* is
``(J - J_pre) / (alpha E_c[log Z_c] - J_pre)`` with ``J_pre = E_pre[r]``, the prompts weighted
as in ``J``.

The same runs give the optimum's own path KL to the pretrained chain,
``KL(p* || p_pre) = E*[r] / alpha - log Z`` (``p* = p_pre exp(r / alpha) / Z``), ``E*[r]`` the
runs' importance-weighted mean reward: how far the best model moves the base, the scale an
expert's path KL reads against (a converged expert need not move further than the optimum).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusion_blend.blend import Denoiser, select_rows
from diffusion_blend.domains.base import Domain
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range
from diffusion_blend.smc import log_mean_exp, log_z_stderr, smc_sample

Reward = Callable[..., torch.Tensor]


def objective(domain: Domain, model: Denoiser, reward: Reward, alpha: float,
              seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trajectory's reward and path KL to the pretrained chain (``model`` sampled)."""
    cond = domain.cond(seeds)
    res = sample(model, domain.schedule, seeds, domain.shape, domain.steps, cond=cond,
                 reference=domain.base)
    with torch.no_grad():
        return reward(res.x0, **cond).double(), res.kls.sum(0).double()


def condition_groups(cond: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the ``n`` rows' condition index (equal conditioning, equal index) and the first
    row of every condition; without per-row conditioning, one condition."""
    def key(i: int) -> tuple:
        return tuple(v[i].cpu().numpy().tobytes() for v in cond.values()
                     if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n)
    index: dict[tuple, int] = {}
    ids = torch.tensor([index.setdefault(key(i), len(index)) for i in range(n)])
    return ids, torch.stack([(ids == k).nonzero()[0, 0] for k in range(len(index))])


def optimum_estimates(domain: Domain, proposal: Denoiser, reward: Reward, alpha: float,
                      cond: dict, n: int, runs: int, particles: int, seed: int) -> dict:
    """SMC estimates of ``E_c[log E_pre[exp(r / alpha) | c]]`` over the ``n`` rows of ``cond``
    and of the tilted law's mean reward ``E_c[E*[r | c]]``, with standard errors: ``runs`` runs
    per condition (``log Z_c`` from the mean of its runs' unbiased ``Z`` estimates, ``E*[r | c]``
    their ``Z``-weighted mean; errors by the delta method), weighted by their rows."""
    ids, first = condition_groups(cond, n)
    rows = first.repeat_interleave(runs)
    run_cond = {k: select_rows(v, rows, n) for k, v in cond.items()}
    res = smc_sample(proposal, domain.base, lambda x0, **c: reward(x0, **c).double() / alpha,
                     domain.schedule, seed_range(seed, len(rows)), domain.shape, domain.steps,
                     particles, ess_threshold=0.0, cond=run_cond, twist=False)
    with torch.no_grad():
        r = reward(res.x0, **res.cond).double().view(len(first), runs, particles)
    per_run = res.log_z.view(len(first), runs)
    run_means = (res.log_weights.view(len(first), runs, particles).exp() * r).sum(2)
    share = torch.bincount(ids, minlength=len(first)).double() / n
    lz, lz_se, m, m_se = torch.tensor(
        [(log_mean_exp(z), log_z_stderr(z), *tilted_mean(z, rm))
         for z, rm in zip(per_run, run_means, strict=True)], dtype=torch.float64).T
    return {"log_z": float(share @ lz), "log_z_se": float((share.pow(2) @ lz_se.pow(2)).sqrt()),
            "tilted_reward": float(share @ m),
            "tilted_reward_se": float((share.pow(2) @ m_se.pow(2)).sqrt())}


def tilted_mean(log_z: torch.Tensor, run_means: torch.Tensor) -> tuple[float, float]:
    """``sum_i Z_i m_i / sum_i Z_i`` over independent runs (``m_i`` a run's self-normalised
    mean, ``Z_i`` its estimate) and its delta-method standard error: a ratio estimator."""
    z = (log_z - log_z.max()).exp()
    m = float((z * run_means).sum() / z.sum())
    if len(z) < 2:
        return m, 0.0
    return m, float((z * (run_means - m)).std() / z.mean() / math.sqrt(len(z)))


def gain_ratio(domain: Domain, model: Denoiser, reward: Reward, alpha: float, n: int = 512,
               runs: int = 16, particles: int = 16, seed: int = 0) -> dict:
    """The model's objective, the pretrained one, the SMC optimum (``runs`` per condition) and
    the gain ratio, each with its standard error (model and pretrained chain on the same
    seeds; stratified where the seed fixes the condition)."""
    seeds = seed_range(seed, n)
    r, kl = objective(domain, model, reward, alpha, seeds)
    r_pre, _ = objective(domain, domain.base, reward, alpha, seeds)
    (j, j_pre, gain), (j_se, j_pre_se, gain_se) = mean_and_stderr(
        torch.stack([r - alpha * kl, r_pre, r - alpha * kl - r_pre], 1), domain.strata(seeds))
    opt = optimum_estimates(domain, model, reward, alpha, domain.cond(seeds), n, runs, particles,
                            seed + n)
    lz, lz_se = opt["log_z"], opt["log_z_se"]
    room = alpha * lz - j_pre
    ratio = gain / room
    ratio_se = abs(ratio) * math.hypot(gain_se / gain if gain else 0.0,
                                       math.hypot(alpha * lz_se, j_pre_se) / room)
    return {"objective": j, "objective_se": j_se, "pretrained_objective": j_pre,
            "path_kl": float(kl.mean()), "log_z": lz, "log_z_se": lz_se,
            "optimum": alpha * lz, "gain_ratio": ratio, "gain_ratio_se": ratio_se,
            "optimum_reward": opt["tilted_reward"],
            "optimum_path_kl": opt["tilted_reward"] / alpha - lz,
            "optimum_path_kl_se": math.hypot(opt["tilted_reward_se"] / alpha, lz_se)}
