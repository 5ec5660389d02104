"""The baselines Diffusion Blend is compared with, as small pieces over any denoiser.

- rewarded soup (RS): one network whose weights interpolate the experts'; each domain makes its
  own (``Domain.soup``: ``adapters.LoraSoup`` for LoRA experts, ``domains.toy2d.mixture_soup``);
- reward-gradient guidance (RGG, DPS-style): ``RewardGuided`` adds ``gamma * grad r_w(x0_hat)``
  to the score, so ``eps' = eps - sqrt(1 - abar_t) * gamma * grad``;
- CoDe: ``code_sample``, blockwise best-of-N over the predicted clean sample's reward.

Each takes the reward as a plain function ``r_w(x0, **cond) -> [B]``: it does not know who calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffusion_blend.blend import Denoiser, nfe_of
from diffusion_blend.errors import UsageError
from diffusion_blend.pipelines import repeat_batch
from diffusion_blend.sampling import (
    SampleResult,
    Schedule,
    Step,
    chain_noise,
    chain_steps,
    predict_x0,
    run_steps,
    step,
)

RewardFn = Callable[..., torch.Tensor]


class RewardGuided:
    """RGG: the denoiser's score plus ``gamma * grad_x r(x0_hat(x_t))`` (DPS: the gradient flows
    through the network). ``normalise``: the gradient is rescaled per sample to norm
    ``sqrt(d)``, so ``gamma`` is a step per dimension. ``gamma = 0`` is the plain denoiser."""

    def __init__(self, denoiser: Denoiser, reward: RewardFn, schedule: Schedule, gamma: float,
                 normalise: bool = False):
        if not math.isfinite(gamma):
            raise UsageError(f"rgg gamma={gamma} must be a finite number")
        self.denoiser, self.reward, self.gamma, self.normalise = denoiser, reward, gamma, normalise
        self.abar = schedule.abar

    @property
    def nfe(self) -> float:
        return nfe_of(self.denoiser)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.gamma == 0.0:
            return self.denoiser(x, t, **cond)
        abar = self.abar.to(x.device)[t.long().reshape(-1)].to(x.dtype)
        abar = abar.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = self.denoiser(xg, t, **cond)
            r = self.reward(predict_x0(eps, xg, abar), **cond)
            (grad,) = torch.autograd.grad(r.sum(), xg)
        if self.normalise:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (x[0].numel() ** 0.5 / norm).reshape(-1, *([1] * (x.ndim - 1)))
        return (eps - (1.0 - abar).sqrt() * self.gamma * grad).detach()


@torch.no_grad()
def code_sample(denoiser: Denoiser, schedule: Schedule, seeds: Sequence[int],
                shape: tuple[int, ...], steps: int | None, reward: RewardFn, n: int, block: int,
                cond: dict | None = None) -> tuple[SampleResult, float]:
    """CoDe: every ``block`` steps draw ``n`` continuations of each sample, score each by the
    reward of its predicted clean sample, keep the best. Continuation 0 uses the plain sampler's
    noise, so ``n = 1`` is plain DDPM sampling. Returns the result and reward evals per sample."""
    if n < 1 or block < 1:
        raise UsageError(f"code: n={n} and block={block} must both be >= 1")
    plan, b = chain_steps(schedule, steps), len(seeds)
    noise = torch.cat([chain_noise(seeds, len(plan), shape, s)
                       for s in ["noise"] + [f"code-{j}" for j in range(1, n)]])
    cond_n, evals = repeat_batch(cond or {}, b, n), [0.0]

    def one(st: Step, xs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return step(denoiser, xs, st.t, st.abar_t, st.abar_s, z, cond=cond_n).x

    def select(st: Step, xs: torch.Tensor) -> torch.Tensor | None:
        """At a block's end: the best continuation of each sample, repeated for the next."""
        if n == 1 or not (st.last or (st.k + 1) % block == 0):
            return None
        x0_hat = xs if st.last else _predicted_x0(denoiser, xs, plan[st.k + 1], cond_n)
        evals[0] += n
        best = reward(x0_hat, **cond_n).reshape(n, b).argmax(0)
        return xs.reshape(n, b, *shape)[best, torch.arange(b)].repeat(n, *([1] * len(shape)))

    x = run_steps(one, noise[:b, 0].repeat(n, *([1] * len(shape))), plan, noise, select)
    blocks = -(-len(plan) // block)
    nfe = n * nfe_of(denoiser) * (len(plan) + (blocks - 1 if n > 1 else 0))
    return SampleResult(x0=x[:b], nfe_per_sample=nfe), evals[0]


def _predicted_x0(denoiser: Denoiser, xs: torch.Tensor, nxt: Step, cond: dict) -> torch.Tensor:
    """``x0_hat`` of states about to take step ``nxt``."""
    eps = denoiser(xs, nxt.timesteps(xs.shape[0]), **cond)
    return predict_x0(eps, xs, nxt.abar_t)
