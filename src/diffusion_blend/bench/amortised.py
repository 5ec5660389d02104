"""``dblend bench amortised --domain fashion|digits``: how closely the distilled blend (one network
evaluation per step) follows DB-MPA over the w grid at each lambda of its training range, and
what an image costs next to the single model.

Both methods sample the same seeds (paired): for each lambda the error is the largest
``|r_w(amortised) - r_w(DB-MPA)|`` over the w grid divided by the range of DB-MPA's ``r_w``
over that grid (a gap that matters for the front, not for one point).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_blend.bench.digits import best_of, cost_of, plain_time
from diffusion_blend.blend import Preference
from diffusion_blend.domains import image_domain
from diffusion_blend.domains.images import ImageDomain
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.seeding import seed_range

LAMS = (0.5, 1.0, 1.5)
W_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def paired_r_w(domain: ImageDomain, pref: Preference, seeds: list[int]) -> dict:
    """Mean ``r_w`` of DB-MPA and of the amortised blend on ``seeds``, and their paired
    difference with its standard error (stratified by the seeds' classes)."""
    w = torch.tensor(pref.w, dtype=torch.float64)
    cond = domain.cond(seeds)
    r = {m: domain.rewards(run_method(m, domain, pref, seeds).x0, **cond).double() @ w
         for m in ("db-mpa", "amortised")}
    (mpa, ours, diff), (_, _, se) = mean_and_stderr(
        torch.stack([r["db-mpa"], r["amortised"], r["amortised"] - r["db-mpa"]], 1),
        domain.strata(seeds))
    return {"w": list(pref.w), "db_mpa": mpa, "amortised": ours, "diff": diff, "diff_se": se}


def relative_error(rows: list[dict]) -> float:
    """The largest gap over the w grid as a share of DB-MPA's ``r_w`` range over it."""
    mpa = [r["db_mpa"] for r in rows]
    return max(abs(r["diff"]) for r in rows) / (max(mpa) - min(mpa))


def bench_amortised(n: int = 500, lams: Sequence[float] = LAMS, seed: int = 0,
                    weights_dir: Path | None = None, domain_name: str = "digits",
                    progress: bool = False) -> dict:
    """Per lambda, ``r_w`` of both methods over the w grid and the largest relative gap;
    the amortised blend's time per image over the plain network's (best of two, on at most
    200 of the seeds)."""
    domain = image_domain(domain_name)(weights_dir=weights_dir)
    if domain.amortised(Preference((0.5, 0.5))) is None:
        raise UsageError(f"no amortised blend in {domain.experts_dir}; distil one with "
                         f"`{domain.spec.recipe('amortised')}`")
    seeds = seed_range(seed, n)
    jobs = tqdm([(lam, w1) for lam in lams for w1 in W_GRID], disable=not progress,
                desc="lambda x w")
    rows: dict[str, list] = {}
    for lam, w1 in jobs:
        rows.setdefault(f"{lam:g}", []).append(
            paired_r_w(domain, Preference((w1, 1 - w1), lam, True), seeds))
    time_seeds = seeds[:200]       # a batch of at most 200 images, the same for both timings
    amortised = best_of(lambda: cost_of(run_method("amortised", domain, Preference((0.5, 0.5)),
                                               time_seeds)))[0]
    single = best_of(lambda: plain_time(domain.spec, domain.cond(time_seeds)["y"], time_seeds,
                                        weights_dir))[0]
    return {"domain": domain_name, "n": n, "w_grid": list(W_GRID), "rows": rows,
            "max_rel_error_by_lam": {lam: relative_error(r) for lam, r in rows.items()},
            "time_vs_single": amortised / single}
