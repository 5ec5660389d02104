"""``dblend bench finetune-toy2d --suite``: both estimators on problems nobody tuned on.

The presets (``toy2d-pathwise``, ``toy2d-dpok``) were tuned on ``bimodal-linear``,
``bimodal`` and (pathwise's plateau window) ``trimodal-3d`` and then frozen; none of the
suite's specs below was looked at while tuning. They vary the number of modes (2-5), the
dimension (2-4), alpha (0.3-2) and the reward (linear, quadratic, a mix of both). Each run
trains with the default stopping rule and reports its gain ratio against the closed-form
optimum on fresh trajectories. The suite can be stopped and continued with ``--resume``
(finished runs are kept, unfinished ones resume from their checkpoints).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from diffusion_blend.domains.toy2d import load_problem
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.config import preset
from diffusion_blend.finetune.toy2d import finetune_toy2d
from diffusion_blend.io import prepare_out_dir, read_json, read_marker, write_json, write_text

KIND = "bench-finetune-toy2d-suite"
ESTIMATORS = ("toy2d-pathwise", "toy2d-dpok")
TARGETS = {"toy2d-pathwise": 0.95, "toy2d-dpok": 0.93}
SCHEDULE = {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02}


def _iso(d: int, v: float) -> list[list[float]]:
    return [[v if i == j else 0.0 for j in range(d)] for i in range(d)]


def _lin(*a: float) -> dict:
    return {"type": "linear", "a": list(a)}


def _quad(c: list[float], q: float) -> dict:
    return {"type": "quadratic", "c": c, "Q": _iso(len(c), q)}


def _spec(weights, means, var, rewards, alpha) -> dict:
    d = len(means[0])
    covs = [_iso(d, v) for v in (var if isinstance(var, list) else [var] * len(means))]
    return {"mixture": {"weights": weights, "means": means, "covs": covs}, "rewards": rewards,
            "alpha": alpha, "schedule": SCHEDULE}


SUITE: dict[str, tuple[dict, list[float]]] = {
    "tri-2d-mixed": (_spec([0.6, 0.3, 0.1], [[-2, 0], [2, 1], [0, -2.5]], [0.3, 0.5, 0.2],
                           [_lin(1, 0.5), _quad([0, -2], 0.5)], 0.7), [0.5, 0.5]),
    "penta-2d-linear": (_spec([0.2] * 5, [[2, 0], [0.6, 1.9], [-1.6, 1.2], [-1.6, -1.2],
                                          [0.6, -1.9]], 0.2, [_lin(1.5, 1.0)], 2.0), [1.0]),
    "bi-3d-quadratic": (_spec([0.7, 0.3], [[-1.5, 0, 0], [1.5, 0.5, -0.5]], [0.4, 0.3],
                              [_quad([1, 0, 0.5], 0.5)], 0.3), [1.0]),
    "quad-4d-mixed": (_spec([0.4, 0.3, 0.2, 0.1], [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0],
                                                   [0, 0, 0, 2]], 0.3,
                            [_lin(0.5, 0, -0.5, 1), _quad([0, 0, 0, 1], 1.0)], 1.0),
                      [0.7, 0.3]),
    "tri-3d-linear": (_spec([0.5, 0.25, 0.25], [[0, 0, 0], [2, -1, 1], [-1, 2, -1]], 0.3,
                            [_lin(0, 0.5, -0.5)], 0.5), [1.0]),
    "quad-2d-linear": (_spec([0.1, 0.2, 0.3, 0.4], [[-3, 0], [-1, 0], [1, 0], [3, 0]], 0.25,
                             [_lin(0.5, 0.3)], 0.3), [1.0]),
}


def run_one(name: str, estimator: str, out: Path, quick: bool) -> dict:
    """Train (or resume, or read back) one spec with one preset; its row of the table."""
    spec, w = SUITE[name]
    problem = load_problem(spec)
    scale = dict(batch_size=32, eval_every=2, patience=1, stop_trajectories=64,
                 eval_trajectories=512, iterations=6, sample_steps=50) if quick else {}
    cfg = preset(estimator, w=tuple(w), alpha=problem.alpha, **scale)
    run = out / f"{name}_{estimator}"
    if (run / "result.json").is_file():
        r = read_json(run / "result.json", "suite run result")
    else:
        resume = (run / "checkpoints" / "latest.json").is_file()
        r = finetune_toy2d(problem, cfg, run, resume=resume, progress=False)
    return {"spec": name, "estimator": r["estimator"], "modes": len(spec["mixture"]["weights"]),
            "dim": len(spec["mixture"]["means"][0]), "alpha": problem.alpha,
            "rewards": "+".join(x["type"] for x in spec["rewards"]), "w": w,
            "iterations": r["iterations"], "converged": r["converged"],
            "seconds": round(r["seconds"], 1), "gain_ratio": r["gain_ratio"],
            "gain_ratio_stderr": r["gain_ratio_stderr"], "path_kl": r["path_kl"],
            "target_kl": r["target_kl"]}


def bench_suite(out: str | Path = "bench-finetune-suite", overwrite: bool = False,
                resume: bool = False, quick: bool = False) -> dict:
    """Run every spec with both presets; writes ``report.md`` and ``result.json``."""
    out = Path(out)
    if resume:
        if (read_marker(out) or {}).get("kind") != KIND:
            raise UsageError(f"--resume: {out} holds no {KIND} output")
    else:
        prepare_out_dir(out, overwrite, KIND)
    rows = [run_one(name, est, out, quick) for name in SUITE for est in ESTIMATORS]
    result = {"rows": rows, "summary": summary(rows)}
    write_json(out / "result.json", result)
    write_text(out / "report.md", report(result))
    return result


def summary(rows: list[dict]) -> dict:
    """Per estimator: median and worst gain ratio, and whether every spec met its target."""
    out = {}
    for est, target in TARGETS.items():
        ratios = [r["gain_ratio"] for r in rows if f"toy2d-{r['estimator']}" == est]
        out[est] = {"median": statistics.median(ratios), "worst": min(ratios),
                    "target": target, "all_meet_target": min(ratios) >= target}
    return out


def report(result: dict) -> str:
    """The README table: one row per spec and estimator, then median and worst."""
    lines = ["| spec | modes | dim | alpha | reward (w) | estimator | iterations | train s | "
             "gain_ratio | path KL | KL(p*||p) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['spec']} | {r['modes']} | {r['dim']} | {r['alpha']} | "
                     f"{r['rewards']} {r['w']} | {r['estimator']} | {r['iterations']} | "
                     f"{r['seconds']} | {r['gain_ratio']:.3f} ± {r['gain_ratio_stderr']:.3f} | "
                     f"{r['path_kl']:.3f} | {r['target_kl']:.3f} |")
    lines += ["", "| preset | median gain_ratio | worst | target | every spec meets it |",
              "|---|---|---|---|---|"]
    for est, s in result["summary"].items():
        lines.append(f"| {est} | {s['median']:.3f} | {s['worst']:.3f} | {s['target']} | "
                     f"{s['all_meet_target']} |")
    return "\n".join(lines) + "\n"
