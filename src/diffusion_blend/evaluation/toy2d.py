"""Sampling runs on the exact testbed: every method measured against the closed-form target.

``run_sample`` is what ``dblend sample toy2d`` prints; ``run_gap`` sweeps ``w`` and measures the
Jensen gap (blend against exact target); ``run_demo`` writes the toy2d demo report.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from diffusion_blend.blend import BlendedDenoiser, Denoiser, Preference, StochasticBlend
from diffusion_blend.domains.toy2d import PRESETS, GaussianMixture, Toy2dProblem, load_problem
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.metrics import energy_distance, mean_and_stderr
from diffusion_blend.io import prepare_out_dir, save_figure, write_json, write_text
from diffusion_blend.sampling import SAMPLERS, sample
from diffusion_blend.seeding import sample_uniforms, seed_range

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
METHODS = ("pretrained", "exact", "db-mpa", "db-mpa-ls", "smc")
REFERENCE_SEED_OFFSET = 1_000_000_000  # exact reference samples use seeds disjoint from runs


@dataclass
class Toy2dSampleConfig:
    """One sampling run on a toy2d problem (``w`` defaults to uniform over the rewards)."""

    spec: str | dict = "bimodal"
    method: str = "db-mpa"
    w: tuple[float, ...] | None = None
    lam: float = 1.0
    n: int = 20000
    steps: int = 1000
    sampler: str = "ddpm"
    eta: float = 1.0
    seed: int = 0
    allow_extrapolation: bool = False
    experts: tuple[str, ...] = ()
    particles: int = 64            # smc: particles per run (n // particles runs)
    ess_threshold: float = 0.5     # smc: resample when ESS < threshold * particles

    def preference(self, k: int) -> Preference:
        w = self.w if self.w is not None else (1.0 / k,) * k
        return Preference.for_experts(w, k, self.lam, self.allow_extrapolation)

    def check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r} is not known; use one of {METHODS}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler!r} is not known; use one of {SAMPLERS}")
        for name in ("n", "steps"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name} {getattr(self, name)} is not allowed; use >= 1")
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed} is not allowed; use >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise UsageError(f"--eta {self.eta} is not allowed; use 0 <= eta <= 1")
        if self.method == "smc" and (self.particles < 1 or self.n % self.particles
                                     or self.sampler != "ddpm"):
            raise UsageError(f"--method smc: --particles {self.particles} must be >= 1 and "
                             f"divide --n {self.n}, with --sampler ddpm")


def check_memory(cfg: Toy2dSampleConfig, problem: Toy2dProblem) -> None:
    """Refuse a run that cannot fit: the chain draws all its noise up front (float32, one
    draw per step and sample), and the reference and rewards hold a few copies of the output."""
    from diffusion_blend.io import require_memory

    per_sample = problem.mixture.dim * (4 * (cfg.steps + 2) + 8 * 16)
    require_memory(cfg.n * per_sample, f"--n {cfg.n} with --steps {cfg.steps}")


def build_denoiser(
    problem: Toy2dProblem, method: str, pref: Preference, seeds: list[int],
    experts: list[Denoiser] | None = None,
) -> Denoiser:
    """The denoiser a method samples with (exact experts unless learned ones are given)."""
    base = problem.base_denoiser()
    if method == "pretrained":
        return base
    experts = experts or [problem.expert_denoiser(i) for i in range(problem.k)]
    if method == "db-mpa":
        return BlendedDenoiser(base, experts, pref)
    c_pre, c = pref.coefficients()
    return StochasticBlend([base, *experts], [max(c_pre, 0.0), *c], seeds, problem.schedule.T)


def run_sample(
    cfg: Toy2dSampleConfig, problem: Toy2dProblem | None = None, progress: bool = False,
    learned: list | None = None,
) -> tuple[dict, torch.Tensor]:
    """Sample ``cfg.n`` points with ``cfg.method``; summary against the exact target, samples.

    ``learned``: fine-tuned experts (``finetune.toy2d.LearnedExpert``) replacing the exact ones;
    expert i was trained for reward weights ``W_i``, so the target of ``(w, lam)`` is the base
    tilted by ``lam * sum_i w_i W_i . r``.
    """
    cfg.check()
    problem = problem or load_problem(cfg.spec)
    check_memory(cfg, problem)
    problem, basis = _with_learned(problem, learned)
    pref = cfg.preference(basis.shape[0])
    c = (pref.lam * torch.tensor(pref.w, dtype=torch.float64) @ basis).tolist()
    target, log_z = problem.tilted(c)
    seeds = seed_range(cfg.seed, cfg.n)
    start, extra = time.perf_counter(), {}
    experts = [e.denoiser for e in learned] if learned else None
    if cfg.method == "exact":
        x0, nfe = target.sample(seeds).float(), 0.0
    elif cfg.method == "smc":
        x0, nfe, extra = run_smc(problem, pref, c, seeds, cfg, experts)
    else:
        den = build_denoiser(problem, cfg.method, pref, seeds, experts)
        res = sample(den, problem.schedule, seeds, (problem.mixture.dim,), cfg.steps,
                     cfg.sampler, cfg.eta, progress=progress)
        x0, nfe = res.x0, res.nfe_per_sample
    seconds = time.perf_counter() - start
    means, errs = mean_and_stderr(problem.rewards_of(x0.double()))
    if extra:   # smc: the weighted estimate of each run, then its spread over the runs
        means, errs = extra.pop("mean_rewards"), extra.pop("stderr_rewards")
    reference = target.sample(seed_range(REFERENCE_SEED_OFFSET + cfg.seed, min(cfg.n, 4000)))
    summary = {
        "method": cfg.method, "w": list(pref.w), "lam": pref.lam, "n": cfg.n,
        "steps": cfg.steps, "sampler": cfg.sampler, "seed": cfg.seed,
        "nfe_per_sample": nfe, "mean_rewards": means, "stderr_rewards": errs,
        "target_mean_rewards": problem.expected_rewards(target), "target_log_z": log_z,
        "target_coefficients": c, "energy_distance": energy_distance(x0, reference),
        "seconds": seconds, **extra,
    }
    if learned:
        summary["experts"] = [str(e.path) for e in learned]
    return summary, x0


def run_smc(problem: Toy2dProblem, pref: Preference, c: list[float], seeds: list[int],
            cfg: Toy2dSampleConfig, experts: list | None) -> tuple[torch.Tensor, float, dict]:
    """SMC with the blend as proposal towards the base tilted by ``c . r / alpha``: equally
    weighted samples (each run resampled by its final weights), NFE per particle, and the
    weighted estimates with their diagnostics."""
    from diffusion_blend.smc import smc_sample, systematic

    coef = torch.tensor(c, dtype=torch.float64) / problem.alpha

    def potential(x0: torch.Tensor, **_) -> torch.Tensor:
        return problem.rewards_of(x0.double()) @ coef

    res = smc_sample(build_denoiser(problem, "db-mpa", pref, seeds, experts),
                     problem.base_denoiser(), potential, problem.schedule, seeds,
                     (problem.mixture.dim,), cfg.steps, cfg.particles, cfg.ess_threshold)
    means, errs = mean_and_stderr(res.weighted_mean(problem.rewards_of(res.x0.double())))
    r, p = res.log_weights.shape
    u = sample_uniforms(seeds[::p], (), stream="smc-output")
    flat = (systematic(res.log_weights, u) + p * torch.arange(r)[:, None]).reshape(-1)
    collapsed = res.collapsed_runs()
    if collapsed:
        log.warning("smc: %d of %d runs ended with fewer than 2 effective particles: their "
                    "estimates are unreliable (use more --particles)", collapsed, r)
    return res.x0[flat], res.nfe_per_particle, {
        "final_ess_min": float(res.final_ess.min()), "ess_collapsed_runs": collapsed,
        "mean_rewards": means, "stderr_rewards": errs, "particles": p, "runs": r,
        "ess_min": res.ess_min, "resampling_count": res.resampling_count,
        "log_z_estimate": res.log_z_estimate(),
        "log_z_stderr": float(res.log_z.exp().std() / res.log_z.exp().mean() / r**0.5)}


def _with_learned(problem: Toy2dProblem, learned: list | None):
    """The problem at the experts' alpha, and the basis ``W`` (one row of reward weights per
    expert; the identity for the exact experts)."""
    if not learned:
        return problem, torch.eye(problem.k, dtype=torch.float64)
    alphas = {e.alpha for e in learned}
    if len(alphas) != 1:
        raise UsageError(f"--experts were trained at different alphas {sorted(alphas)}; "
                         "blend experts trained at one alpha")
    from diffusion_blend.finetune.toy2d import with_alpha

    return with_alpha(problem, alphas.pop()), torch.tensor([e.w for e in learned],
                                                           dtype=torch.float64)


def save_sample_run(out: Path, cfg: Toy2dSampleConfig, summary: dict, x0: torch.Tensor,
                    problem: Toy2dProblem) -> None:
    """Samples (safetensors), resolved config, summary and a scatter plot over the target."""
    from safetensors.torch import save_file

    from diffusion_blend.io import atomic_write

    atomic_write(out / "samples.safetensors", lambda p: save_file({"x0": x0.contiguous()}, p))
    resolved = dataclasses.asdict(cfg) | {"spec": problem.spec, "w": summary["w"]}
    write_json(out / "config.json", resolved)
    write_json(out / "result.json", summary)
    target, _ = problem.tilted(summary["target_coefficients"])
    title = f"{cfg.method}  w={summary['w']}  lam={summary['lam']}"
    save_figure(scatter_figure(x0, target, title), out / "scatter.png")


# ---------------------------------------------------------------------------- plots


def scatter_figure(x0: torch.Tensor, target: GaussianMixture, title: str,
                   max_points: int = 3000) -> Figure:
    """Samples (first two coordinates) over the target density's contours (2-D problems)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    pts = x0[:max_points].double()
    lo, hi = pts.min(0).values - 1.0, pts.max(0).values + 1.0
    if target.dim == 2:
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 120),
                                torch.linspace(lo[1], hi[1], 120), indexing="xy")
        dens = target.log_prob(torch.stack([gx, gy], -1).reshape(-1, 2)).exp().reshape(gx.shape)
        ax.contour(gx, gy, dens, levels=8, cmap="Greys")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.35, color="tab:blue")
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")
    return fig


# ---------------------------------------------------------------------------- the Jensen gap


def simplex_grid(k: int, divisions: int) -> list[tuple[float, ...]]:
    """All ``w`` on the simplex whose entries are multiples of ``1 / divisions``."""
    pts = [c for c in itertools.product(range(divisions + 1), repeat=k) if sum(c) == divisions]
    return [tuple(ci / divisions for ci in c) for c in sorted(pts, reverse=True)]


def run_gap(
    problem: Toy2dProblem, n: int = 10000, steps: int = 1000, seed: int = 0,
    divisions: int = 10, progress: bool = False,
) -> list[dict]:
    """Blend against exact target over a ``w`` grid at ``lam = 1`` (the Jensen gap)."""
    rows = []
    for w in tqdm(simplex_grid(problem.k, divisions), disable=not progress, desc="w grid"):
        cfg = Toy2dSampleConfig(spec=problem.spec, w=w, n=n, steps=steps, seed=seed)
        summary, _ = run_sample(cfg, problem)
        gap = [m - t for m, t in zip(summary["mean_rewards"], summary["target_mean_rewards"],
                                     strict=True)]
        rows.append(summary | {"gap": gap})
    return rows


def gap_figure(rows: list[dict]) -> Figure:
    """Each basis reward's mean under the blend (with 2-sigma bars) and under the exact target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(rows[0]["w"])
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.4), squeeze=False)
    xs = [r["w"][0] for r in rows] if k == 2 else list(range(len(rows)))
    for i, ax in enumerate(axes[0]):
        ax.errorbar(xs, [r["mean_rewards"][i] for r in rows],
                    yerr=[2 * r["stderr_rewards"][i] for r in rows], fmt="o-", ms=3,
                    label="blend (DB-MPA)")
        ax.plot(xs, [r["target_mean_rewards"][i] for r in rows], "k--", label="exact target")
        ax.set_xlabel("w_1" if k == 2 else "grid point")
        ax.set_ylabel(f"E[r_{i + 1}]")
        ax.legend(fontsize=8)
    fig.suptitle("Jensen gap: blended process vs exact tilted target (lam = 1)", fontsize=9)
    return fig


def gap_table(rows: list[dict]) -> str:
    """Markdown table of the gap sweep, with the gap in units of its standard error."""
    k = len(rows[0]["w"])
    head = ["w"] + [f"blend E[r{i + 1}]" for i in range(k)] + [f"exact E[r{i + 1}]" for i in
                                                                range(k)]
    head += [f"gap r{i + 1} (z)" for i in range(k)] + ["energy dist."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        z = [g / max(e, 1e-12) for g, e in zip(r["gap"], r["stderr_rewards"], strict=True)]
        cells = [",".join(f"{v:.2f}" for v in r["w"])]
        cells += [f"{m:.3f} ± {e:.3f}" for m, e in zip(r["mean_rewards"], r["stderr_rewards"],
                                                        strict=True)]
        cells += [f"{t:.3f}" for t in r["target_mean_rewards"]]
        cells += [f"{g:+.3f} ({zi:+.1f})" for g, zi in zip(r["gap"], z, strict=True)]
        cells.append(f"{r['energy_distance']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_gap(out: Path, problem: Toy2dProblem, rows: list[dict], name: str = "gap") -> None:
    write_json(out / f"{name}.json", {"spec": problem.spec, "rows": rows})
    write_text(out / f"{name}.md", gap_table(rows))
    save_figure(gap_figure(rows), out / f"{name}.png")


# ---------------------------------------------------------------------------- the demo

DEMO_SPECS = {
    "bimodal": "r1 = x_1 (linear), r2 = -|x - (0, 1)|^2 / 2 (quadratic)",
    "bimodal-linear": "r1 = x_1, r2 = x_2 (both linear)",
}


def run_demo(out: str | Path = "dblend-demo", overwrite: bool = False, n: int = 6000,
             steps: int = 1000, progress: bool = True) -> Path:
    """Gap sweeps on ``bimodal`` (and ``bimodal-linear``), scatter plots and ``report.md``."""
    out = prepare_out_dir(out, overwrite, "toy2d-demo")
    start = time.perf_counter()
    sections = []
    for spec in DEMO_SPECS:
        problem = load_problem(spec)
        rows = run_gap(problem, n=n, steps=steps, progress=progress)
        write_gap(out, problem, rows, name=f"gap_{spec}")
        sections.append(_demo_section(spec, rows, _demo_scatters(out, problem, spec, n, steps)))
    seconds = time.perf_counter() - start
    write_text(out / "report.md", _demo_report(sections, seconds, n, steps))
    write_json(out / "config.json", {"specs": {s: PRESETS[s] for s in DEMO_SPECS}, "n": n,
                                     "steps": steps, "seed": 0, "sampler": "ddpm"})
    return out


def _demo_scatters(out: Path, problem: Toy2dProblem, spec: str, n: int, steps: int) -> list[str]:
    names = []
    for w in [(1.0, 0.0), (0.5, 0.5), (0.25, 0.75)]:
        for method in ("db-mpa", "exact"):
            cfg = Toy2dSampleConfig(spec=problem.spec, w=w, method=method, n=min(n, 3000),
                                    steps=steps)
            summary, x0 = run_sample(cfg, problem)
            name = f"scatter_{spec}_{method}_w{w[0]:.2f}.png"
            rew = [round(v, 2) for v in summary["mean_rewards"]]
            fig = scatter_figure(x0, problem.target(cfg.preference(2))[0],
                                 f"{spec}: {method}  w={list(w)}  E[r]={rew}")
            save_figure(fig, out / name)
            names.append(name)
    return names


def _demo_section(spec: str, rows: list[dict], images: list[str]) -> str:
    z = [max(abs(g) / max(e, 1e-12) for g, e in zip(r["gap"], r["stderr_rewards"], strict=True))
         for r in rows]
    worst = rows[max(range(len(rows)), key=z.__getitem__)]
    verdict = ("larger than Monte-Carlo error (a real Jensen gap)" if max(z) > 4 else
               "within Monte-Carlo error everywhere (no measurable gap here)")
    return (
        f"## `{spec}`: {DEMO_SPECS[spec]}\n\n" + gap_table(rows) +
        f"\nLargest gap at w = {worst['w']}: {[round(g, 3) for g in worst['gap']]}, "
        f"{max(z):.1f} standard errors: {verdict}. At the endpoints the blend is one exact "
        f"expert, so no gap is expected there.\n\n![gap](gap_{spec}.png)\n\n"
        + "".join(f"![{i}]({i})\n" for i in images) + "\n"
    )


def _demo_report(sections: list[str], seconds: float, n: int, steps: int) -> str:
    return (
        "# diffusion-blend toy2d demo\n\n"
        "Gaussian-mixture bases with two modes at (-2, 0) and (2, 0); alpha = 1; DDPM with "
        f"{steps} steps; DB-MPA (`lam = 1`) blends the exact experts. Each table compares the "
        f"blend with the exact tilted target over a grid of w, n = {n} samples per w; "
        "the energy distance is the unbiased estimate (about 0, possibly slightly negative, "
        "when the laws agree).\n\n" + "".join(sections) + f"Wall time: {seconds:.1f} s.\n"
    )
