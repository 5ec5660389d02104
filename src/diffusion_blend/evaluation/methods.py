"""One method vocabulary and one dispatcher for every domain: a method, a preference, seeds
and the conditioning in; samples and what they cost out (``run_method`` -> ``Output``).
``dblend sample``, the sweeps, the demo, the UI and the benchmarks all sample through it.

A domain plugs in through ``domains.base.Domain``: its base and expert denoisers, its blend,
its rewards, a soup of its experts and, where it has them, MORL fine-tunes, a distilled
(amortised) network and the exact target.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion_blend.baselines import RewardGuided, code_sample
from diffusion_blend.blend import Denoiser, Preference, StochasticBlend
from diffusion_blend.domains.base import Domain
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import SAMPLERS, sample
from diffusion_blend.seeding import sample_uniforms
from diffusion_blend.smc import collapsed, draw_one, log_mean_exp, log_z_stderr, smc_sample

log = logging.getLogger(__name__)
METHODS = ("pretrained", "exact", "db-mpa", "db-mpa-ls", "db-kla", "soup", "code", "rgg", "morl",
           "smc", "amortised", "conditioned-rl")


@dataclass
class MethodConfig:
    """How the methods sample: the sampler, the baselines' knobs (CoDe's N and block length,
    RGG's gamma) and SMC's particles per output sample and resampling threshold."""

    sampler: str = "ddpm"
    eta: float = 1.0
    code_n: int = 4
    code_block: int | None = None     # steps per block; None: a fifth of the chain
    rgg_gamma: float = 0.1
    rgg_normalise: bool = True        # DPS-style: a step of fixed size per dimension
    smc_particles: int = 8            # SMC: one run of this many particles per output sample
    smc_ess_threshold: float = 0.0    # SMC: resample when ESS < threshold * particles (0: never)
    smc_twist: bool = False           # SMC: intermediate potentials on x0_hat (see smc.py)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler!r} is not known; use one of {SAMPLERS}")
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"--eta {self.eta} is not allowed; use 0 <= eta <= 1")
        if self.smc_particles < 1 or self.code_n < 1 or (self.code_block or 1) < 1:
            raise UsageError(f"--particles {self.smc_particles}, --code-n {self.code_n}, "
                             f"--code-block {self.code_block}: each must be >= 1")
        if not 0.0 <= self.smc_ess_threshold <= 1.0:
            raise UsageError(f"--ess-threshold {self.smc_ess_threshold} is not allowed; use a "
                             "value in [0, 1]")
        if not (math.isfinite(self.rgg_gamma) and self.rgg_gamma >= 0):
            raise UsageError(f"--rgg-gamma {self.rgg_gamma} is not allowed; use a finite value "
                             ">= 0")


@dataclass
class Output:
    """Samples and what they cost; ``chain`` is the Markov denoiser sampled (for path KLs).
    SMC adds ``estimates`` (each run's weighted mean of the rewards, ``[n, K]``: better than
    the rewards of the one particle it outputs), ``runs`` (per-run values, one row per output)
    and the diagnostics made of them."""

    x0: torch.Tensor
    nfe_per_sample: float
    reward_evals_per_sample: float
    seconds: float
    peak_memory_mb: float | None      # the process's peak while sampling (GPU: allocator)
    added_memory_mb: float | None     # that peak minus what was resident before the call
    params: int
    chain: Denoiser | None
    estimates: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)
    runs: dict[str, torch.Tensor] = field(default_factory=dict)


def reward_w(domain: Domain, c: list[float]) -> Callable[..., torch.Tensor]:
    """``r_c(x0) = sum_i c_i r_i(x0)`` as a plain function of samples (for CoDe, RGG, SMC)."""
    coef = torch.tensor(c, dtype=torch.float64)
    return lambda x0, **cond: domain.rewards(x0, **cond).double() @ coef


def chain_for(method: str, domain: Domain, pref: Preference, seeds: list[int],
              mcfg: MethodConfig) -> tuple[Denoiser | None, list[str]]:
    """The denoiser a Markov method samples with (None: not available on this domain), and
    the parts it holds in memory."""
    c_pre, c = pref.coefficients()
    experts = [f"expert{i}" for i, v in enumerate(c) if v]
    parts = (["base"] if pref.needs_base() else []) + experts
    if method == "pretrained":
        return domain.base, ["base"]
    if method in ("db-mpa", "db-kla"):
        return domain.blend(pref), parts
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
    if method == "amortised":
        return domain.amortised(pref), ["base"]
    if method == "conditioned-rl":
        return domain.conditioned(pref), ["base"]
    raise UsageError(f"method {method!r} is not known; use one of {METHODS}")


def run_method(method: str, domain: Domain, pref: Preference, seeds: list[int],
               mcfg: MethodConfig | None = None, cond: dict | None = None,
               progress: bool = False) -> Output | None:
    """Sample ``seeds`` with ``method`` at ``pref`` (conditioning ``cond``, by default the
    domain's for these seeds) and measure it; None where the method is unavailable (no MORL
    model or exact target for this preference, RGG with a non-differentiable reward)."""
    mcfg = mcfg or MethodConfig()
    cond = domain.cond(seeds) if cond is None else cond
    if method == "exact":
        return run_exact(domain, pref, seeds)
    if method == "smc":
        return run_smc(domain, pref, seeds, mcfg, cond)
    if method == "code":
        return run_code(domain, pref, seeds, mcfg, cond)
    chain, parts = chain_for(method, domain, pref, seeds, mcfg)
    if chain is None:
        return None
    res, *cost = measure_cost(lambda: sample(chain, domain.schedule, seeds, domain.shape,
                                             domain.steps, mcfg.sampler, mcfg.eta, cond=cond,
                                             progress=progress))
    evals = domain.steps if method == "rgg" and mcfg.rgg_gamma else 0.0
    return Output(res.x0, res.nfe_per_sample, evals, *cost, domain.params(parts), chain)


def run_exact(domain: Domain, pref: Preference, seeds: list[int]) -> Output | None:
    """Exact samples of the target, where the domain knows it in closed form."""
    target = domain.target(pref)
    if target is None:
        return None
    x0, *cost = measure_cost(lambda: target.sample(seeds))
    return Output(x0, 0.0, 0.0, *cost, 0, None)


def run_code(domain: Domain, pref: Preference, seeds: list[int], mcfg: MethodConfig,
             cond: dict) -> Output:
    """CoDe: blockwise best-of-N on the pretrained chain (DDPM)."""
    if mcfg.sampler != "ddpm":
        raise UsageError(f"--method code needs --sampler ddpm, not {mcfg.sampler}")
    block = mcfg.code_block or max(1, domain.steps // 5)
    r = reward_w(domain, pref.coefficients()[1])
    (res, evals), *cost = measure_cost(lambda: code_sample(
        domain.base, domain.schedule, seeds, domain.shape, domain.steps, r, mcfg.code_n,
        block, cond))
    return Output(res.x0, res.nfe_per_sample, evals, *cost, domain.params(["base"]), None)


def run_smc(domain: Domain, pref: Preference, seeds: list[int], mcfg: MethodConfig,
            cond: dict) -> Output:
    """One SMC run of ``P`` particles per output seed (the blend as proposal, target ``p_pre
    exp(lam r_w / alpha)`` at the domain's ``alpha``); each output is one particle drawn by
    the final weights, so outputs are independent. Costs ``P`` times a particle's NFE."""
    if mcfg.sampler != "ddpm":
        raise UsageError(f"--method smc needs --sampler ddpm, not {mcfg.sampler}")
    p, n = mcfg.smc_particles, len(seeds)
    r = reward_w(domain, [ci / domain.alpha for ci in pref.coefficients()[1]])
    res, *cost = measure_cost(lambda: smc_sample(
        domain.blend(pref), domain.base, r, domain.schedule, seeds, domain.shape,
        domain.steps, p, mcfg.smc_ess_threshold, cond=cond, twist=mcfg.smc_twist))
    pick = draw_one(res.log_weights, sample_uniforms(seeds, (), "smc-output"))
    x0 = res.x0.reshape(n, p, *res.x0.shape[1:])[torch.arange(n), pick]
    with torch.no_grad():
        estimates = res.weighted_mean(domain.rewards(res.x0, **res.cond).double())
    experts = [f"expert{i}" for i, v in enumerate(pref.coefficients()[1]) if v]
    if res.collapsed_runs():
        log.warning("smc: %d of %d runs ended with fewer than 2 effective particles: their "
                    "estimates are unreliable (use more particles)", res.collapsed_runs(), n)
    runs = {"log_z": res.log_z, "ess_min": res.run_ess_min, "final_ess": res.final_ess,
            "resamples": res.resamples}
    return Output(x0, p * res.nfe_per_particle, p * float(domain.steps + 1), *cost,
                  domain.params(["base", *experts]), None, estimates, smc_diagnostics(runs, p),
                  runs)


def smc_diagnostics(runs: dict[str, torch.Tensor], particles: int) -> dict:
    """ESS, resampling and ``log Z`` over the runs (``Output.runs``), collapsed runs counted
    (fewer than 2 effective particles at the end)."""
    r, log_z, final = len(runs["log_z"]), runs["log_z"], runs["final_ess"]
    return {"particles": particles, "runs": r, "ess_min": float(runs["ess_min"].min()),
            "final_ess_min": float(final.min()),
            "ess_collapsed_runs": collapsed(final, particles),
            "resampling_count": float(runs["resamples"].mean()),
            "log_z_estimate": log_mean_exp(log_z),
            "log_z_stderr": log_z_stderr(log_z)}


def path_kl(domain: Domain, chain: Denoiser, seeds: list[int]) -> torch.Tensor:
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
