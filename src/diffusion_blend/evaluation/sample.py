"""``dblend sample DOMAIN``: one method at one preference on any domain, and its summary.

The summary reports each basis reward's mean with its standard error (SMC: over its runs'
weighted estimates), the cost, and, where the domain knows the exact target, the target's
expected rewards, ``log Z`` and the energy distance of the samples to exact target samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from diffusion_blend.blend import Preference, select_rows
from diffusion_blend.distributed import Dist
from diffusion_blend.domains.base import Domain
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import METHODS, MethodConfig, run_method, smc_diagnostics
from diffusion_blend.evaluation.metrics import energy_distance, mean_and_stderr
from diffusion_blend.seeding import check_seed_range, seed_range

REFERENCE_SEED_OFFSET = 1_000_000_000  # exact reference samples use seeds disjoint from runs


@dataclass
class SampleConfig:
    """One sampling run (``w`` defaults to uniform over the experts); seeds ``seed ... seed +
    n - 1``, one output sample each."""

    method: str = "db-mpa"
    w: tuple[float, ...] | None = None
    lam: float = 1.0
    allow_extrapolation: bool = False
    n: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r} is not known; use one of {METHODS}")
        if int(self.n) < 1:
            raise UsageError(f"--n {self.n} is not allowed; use >= 1")
        check_seed_range(self.seed, self.n)

    def preference(self, k: int) -> Preference:
        w = self.w if self.w is not None else (1.0 / k,) * k
        return Preference.for_experts(w, k, self.lam, self.allow_extrapolation)


def run_sample(domain: Domain, cfg: SampleConfig, mcfg: MethodConfig | None = None,
               cond: dict | None = None, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Sample with ``cfg.method``; the JSON summary and the samples. Under ``accelerate
    launch`` each process samples every world-th seed and every process gets all samples, in
    seed order (per-sample streams: the samples of one process)."""
    pref = cfg.preference(len(domain.experts))
    dist, seeds = Dist(), seed_range(cfg.seed, cfg.n)
    if dist.world > cfg.n:
        raise UsageError(f"--n {cfg.n} is fewer than the {dist.world} processes; use --n >= "
                         f"{dist.world} or fewer processes")
    cond = domain.cond(seeds) if cond is None else cond
    mine = torch.tensor(dist.shard(range(cfg.n)), dtype=torch.long)
    start = time.perf_counter()
    cond = {k: select_rows(v, mine, cfg.n) for k, v in cond.items()}   # this process's rows
    out = run_method(cfg.method, domain, pref, dist.shard(seeds), mcfg, cond,
                     progress and dist.main)
    if out is None:
        raise UsageError(f"--method {cfg.method} is not available on {domain.name} at "
                         f"w={list(pref.w)}, lam={pref.lam:g}")
    with torch.no_grad():
        values = out.estimates if out.estimates is not None else domain.rewards(
            out.x0, **cond).double()
    x0, values = dist.gather(out.x0, cfg.n), dist.gather(values, cfg.n)
    runs = {k: dist.gather(v, cfg.n) for k, v in out.runs.items()}
    diagnostics = smc_diagnostics(runs, out.diagnostics["particles"]) if runs else out.diagnostics
    means, errs = mean_and_stderr(values.reshape(len(values), -1))
    summary = {"domain": domain.name, "method": cfg.method, "w": list(pref.w),
               "lam": pref.lam, "n": cfg.n, "seed": cfg.seed, "steps": domain.steps,
               "nfe_per_sample": out.nfe_per_sample, "reward_names": domain.reward_names,
               "mean_rewards": means, "stderr_rewards": errs,
               "seconds": time.perf_counter() - start, **diagnostics}
    return summary | target_summary(domain, pref, x0, cfg.seed), x0


def target_summary(domain: Domain, pref: Preference, x0: torch.Tensor, seed: int) -> dict:
    """The exact target's expected rewards and ``log Z``, and the samples' energy distance to
    exact target samples (``{}`` where the target is not known)."""
    target = domain.target(pref)
    if target is None:
        return {}
    ref = target.sample(seed_range(REFERENCE_SEED_OFFSET + seed, min(len(x0), 4000)))
    return {"target_mean_rewards": target.mean_rewards, "target_log_z": target.log_z,
            "energy_distance": energy_distance(x0, ref)}
