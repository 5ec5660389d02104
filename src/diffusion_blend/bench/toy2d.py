"""``dblend bench toy2d``: the exact-expert blend (2 experts, DDPM) against plain numpy.

The numpy reference is the straightforward vectorised loop a reader would write from the paper:
per-component precision matrices, einsum quadratic forms, one global random generator.
"""

from __future__ import annotations

import time

import numpy as np

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.domains.toy2d import GaussianMixture, load_problem
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range


def numpy_mixture_eps(m: dict, x: np.ndarray, abar: float) -> np.ndarray:
    """Exact eps of a noised mixture in numpy (``m`` holds weights, means, covs as arrays)."""
    d = x.shape[1]
    covs = abar * m["covs"] + (1 - abar) * np.eye(d)
    prec = np.linalg.inv(covs)
    diff = x[:, None, :] - np.sqrt(abar) * m["means"][None]             # [B,K,d]
    pd = np.einsum("kde,bke->bkd", prec, diff)
    logn = -0.5 * np.einsum("bkd,bkd->bk", diff, pd) - 0.5 * np.linalg.slogdet(covs)[1]
    logits = logn + np.log(m["weights"])
    resp = np.exp(logits - logits.max(1, keepdims=True))
    resp /= resp.sum(1, keepdims=True)
    return np.sqrt(1 - abar) * np.einsum("bk,bkd->bd", resp, pd)


def numpy_blend_sample(mixtures: list[dict], c: list[float], abar: np.ndarray, n: int,
                       seed: int) -> np.ndarray:
    """DDPM with the blended exact eps of ``mixtures`` (coefficients ``c``), all in numpy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, mixtures[0]["means"].shape[1]), dtype=np.float32)
    for t in range(len(abar) - 1, -1, -1):
        a_t, a_s = abar[t], (abar[t - 1] if t > 0 else 1.0)
        eps = sum(ci * numpy_mixture_eps(m, x, a_t) for ci, m in zip(c, mixtures, strict=True))
        beta = 1 - a_t / a_s
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        mean = np.sqrt(a_s) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x
        var = (1 - a_s) / (1 - a_t) * beta
        x = (mean + np.sqrt(var) * rng.standard_normal(x.shape, dtype=np.float32)
             if t > 0 else mean).astype(np.float32)
    return x


def _as_numpy(m: GaussianMixture) -> dict:
    return {"weights": m.weights.numpy(), "means": m.means.float().numpy(),
            "covs": m.covs.float().numpy()}


def bench_toy2d(n: int = 20000, steps: int = 1000, numpy_reference: bool = True) -> dict:
    """Seconds for DB-MPA with 2 exact experts on ``bimodal``; numpy reference and their ratio."""
    problem = load_problem("bimodal")
    experts = [problem.expert_denoiser(i) for i in range(2)]
    blend = BlendedDenoiser(problem.base_denoiser(), experts, Preference((0.5, 0.5)))
    start = time.perf_counter()
    res = sample(blend, problem.schedule, seed_range(0, n), (2,), steps)
    out = {"n": n, "steps": steps, "experts": 2, "seconds": time.perf_counter() - start,
           "nfe_per_sample": res.nfe_per_sample}
    if numpy_reference and steps == problem.schedule.T:
        mixtures = [_as_numpy(e.mixture) for e in experts]
        abar = problem.schedule.abar.numpy()
        start = time.perf_counter()
        numpy_blend_sample(mixtures, [0.5, 0.5], abar, n, seed=0)
        out["numpy_seconds"] = time.perf_counter() - start
        out["speedup_vs_numpy"] = out["numpy_seconds"] / out["seconds"]
    return out
