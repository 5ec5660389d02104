"""Every method of a sweep behind one interface: a preference, seeds and the domain's
conditioning in; samples and a cost record out (``run_method``).

A domain plugs in through ``SweepDomain``: its base and expert denoisers, its rewards, a soup of
its experts and, where it has one, the MORL oracle for a preference.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from diffusion_blend.baselines import RewardGuided, code_sample
from diffusion_blend.blend import BlendedDenoiser, Denoiser, Preference, StochasticBlend
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import Schedule, sample

METHODS = ("pretrained", "db-mpa", "db-mpa-ls", "db-kla", "soup", "code", "rgg", "morl", "smc")


class SweepDomain(Protocol):
    """What a domain gives the sweep (``toy2d``, ``digits``, ``sd``)."""

    name: str
    reward_names: list[str]
    alpha: float          # the experts' KL strength (the SMC target's temperature)
    schedule: Schedule
    shape: tuple[int, ...]
    steps: int
    base: Denoiser
    experts: list[Denoiser]
    differentiable: bool  # the rewards have gradients (RGG needs them)
    problem: Any          # toy2d: the exact problem (its target is known); else None

    def cond(self, seeds: list[int]) -> dict: ...

    def rewards(self, x0: torch.Tensor, **cond) -> torch.Tensor: ...   # [B, K]

    def images(self, x0: torch.Tensor) -> torch.Tensor: ...   # samples as shown (decoded)

    def soup(self, coefs: list[float]) -> Denoiser: ...

    def morl(self, pref: Preference) -> Denoiser | None: ...

    def params(self, parts: list[str]) -> int: ...


@dataclass
class MethodConfig:
    """Knobs of the baselines (CoDe's N and block length B, RGG's gamma)."""

    code_n: int = 4
    code_block: int | None = None     # steps per block; None: a fifth of the chain
    rgg_gamma: float = 0.1
    rgg_normalise: bool = True        # DPS-style: a step of fixed size per dimension
    smc_particles: int = 8            # SMC: particles per output sample


@dataclass
class Output:
    """Samples and what they cost; ``chain`` is the Markov denoiser sampled (for path KLs)."""

    x0: torch.Tensor
    nfe_per_sample: float
    reward_evals_per_sample: float
    seconds: float
    peak_memory_mb: float | None      # the process's peak while sampling (GPU: allocator)
    added_memory_mb: float | None     # that peak minus what was resident before the call
    params: int
    chain: Denoiser | None


def reward_w(domain: SweepDomain, c: list[float]) -> Callable[..., torch.Tensor]:
    """``r_c(x0) = sum_i c_i r_i(x0)`` as a plain function of samples (for CoDe and RGG)."""
    coef = torch.tensor(c, dtype=torch.float64)
    return lambda x0, **cond: domain.rewards(x0, **cond).double() @ coef


def chain_for(method: str, domain: SweepDomain, pref: Preference, seeds: list[int],
              mcfg: MethodConfig) -> tuple[Denoiser | None, list[str]]:
    """The denoiser a Markov method samples with, and the parts it holds in memory."""
    c_pre, c = pref.coefficients()
    experts = [f"expert{i}" for i, v in enumerate(c) if v]
    parts = (["base"] if pref.needs_base() else []) + experts
    if method == "pretrained":
        return domain.base, ["base"]
    if method in ("db-mpa", "db-kla"):
        return BlendedDenoiser(domain.base, domain.experts, pref), parts
    if method == "db-mpa-ls":
        return StochasticBlend([domain.base, *domain.experts], [max(c_pre, 0.0), *c], seeds,
                               domain.schedule.T), parts
    if method == "soup":
        return domain.soup(c), ["soup", "base"] + experts
    if method == "rgg":
        if not domain.differentiable:
            return None, []   # RGG needs the reward's gradient
        return RewardGuided(domain.base, reward_w(domain, c), domain.schedule, mcfg.rgg_gamma,
                            mcfg.rgg_normalise), ["base"]
    if method == "morl":
        return domain.morl(pref), ["morl"]
    raise UsageError(f"method {method!r} is not known; use one of {METHODS}")


def run_method(method: str, domain: SweepDomain, pref: Preference, seeds: list[int],
               mcfg: MethodConfig) -> Output | None:
    """Sample ``seeds`` with ``method`` at ``pref`` and measure it; None if it is unavailable
    (no MORL oracle for this preference, or RGG with a non-differentiable reward)."""
    if method == "smc":
        return run_smc(domain, pref, seeds, mcfg.smc_particles)
    cond = domain.cond(seeds)
    if method == "code":
        block = mcfg.code_block or max(1, domain.steps // 5)
        r = reward_w(domain, pref.coefficients()[1])
        (res, evals), *cost = measure_cost(lambda: code_sample(
            domain.base, domain.schedule, seeds, domain.shape, domain.steps, r, mcfg.code_n,
            block, cond))
        return Output(res.x0, res.nfe_per_sample, evals, *cost, domain.params(["base"]), None)
    chain, parts = chain_for(method, domain, pref, seeds, mcfg)
    if chain is None:
        return None
    res, *cost = measure_cost(lambda: sample(chain, domain.schedule, seeds, domain.shape,
                                        domain.steps, cond=cond))
    evals = domain.steps if method == "rgg" and mcfg.rgg_gamma else 0.0
    return Output(res.x0, res.nfe_per_sample, evals, *cost, domain.params(parts), chain)


def run_smc(domain: SweepDomain, pref: Preference, seeds: list[int], p: int) -> Output:
    """One SMC run of ``p`` particles per output seed (blend proposal, target ``p_pre exp(lam
    r_w / alpha)`` with the domain's ``alpha``); each output is one particle drawn by the final
    weights. Costs ``p`` times the particle's NFE."""
    from diffusion_blend.seeding import sample_uniforms
    from diffusion_blend.smc import draw_one, smc_sample

    n = len(seeds)
    cond = {k: v.repeat_interleave(p, 0) if isinstance(v, torch.Tensor) and v.ndim and
            v.shape[0] == n else v for k, v in domain.cond(seeds).items()}
    r = reward_w(domain, [ci / domain.alpha for ci in pref.coefficients()[1]])
    particle_seeds = [s * p + j for s in seeds for j in range(p)]
    res, *cost = measure_cost(lambda: smc_sample(
        BlendedDenoiser(domain.base, domain.experts, pref), domain.base, r, domain.schedule,
        particle_seeds, domain.shape, domain.steps, p, cond=cond))
    pick = draw_one(res.log_weights, sample_uniforms(seeds, (), "smc-output"))
    x0 = res.x0.reshape(n, p, *res.x0.shape[1:])[torch.arange(n), pick]
    experts = [f"expert{i}" for i, v in enumerate(pref.coefficients()[1]) if v]
    return Output(x0, p * res.nfe_per_particle, p * float(domain.steps), *cost,
                  domain.params(["base", *experts]), None)


def path_kl(domain: SweepDomain, chain: Denoiser, seeds: list[int]) -> torch.Tensor:
    """Per-sample KL of the sampled chain's path to the pretrained chain's (sum of step KLs)."""
    res = sample(chain, domain.schedule, seeds, domain.shape, domain.steps,
                 cond=domain.cond(seeds), reference=domain.base)
    return res.kls.sum(0)


# ---------------------------------------------------------------------------- measuring


def measure_cost(fn: Callable) -> tuple:
    """``(fn(), seconds, peak MB, peak MB above the start)``: the CUDA allocator's peak on a
    GPU, else the process's peak resident set size, reset before the call (Linux
    ``clear_refs``)."""
    before = _reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds, peak = time.perf_counter() - start, memory_mb("peak")
    added = None if peak is None or before is None else max(peak - before, 0.0)
    return out, seconds, peak, added


def _reset_peak() -> float | None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
    return memory_mb("now")


def memory_mb(which: str) -> float | None:
    if torch.cuda.is_available():
        fn = torch.cuda.max_memory_allocated if which == "peak" else torch.cuda.memory_allocated
        return fn() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{'VmHWM' if which == 'peak' else 'VmRSS'}:\s+(\d+) kB", status)
    return int(m.group(1)) / 1024 if m else None
