"""``dblend bench finetune-toy2d``: the estimators against the analytic optimum.

For each basis reward of the spec (``bimodal-linear``: two linear rewards, alpha 1) it trains
a pathwise expert and a DPOK expert (KL-to-go), and the published DPOK form for the first reward,
recording ``gain_ratio`` along the way (training clock only; evaluation excluded). Training runs
in chunks that end with a checkpoint and continue with ``resume``, so the timeline also exercises
exact resumption. Then it blends the two learned pathwise experts over a ``w`` grid and compares
with the blend of the exact experts and with the exact target.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.domains.toy2d import Toy2dProblem, load_problem
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.finetune.config import preset
from diffusion_blend.finetune.run import train
from diffusion_blend.finetune.toy2d import base_hash, evaluate_expert, make_task
from diffusion_blend.io import prepare_out_dir, write_json, write_text
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range


def timeline(problem: Toy2dProblem, cfg, out: Path, budget_s: float | None, chunk: int,
             eval_n: int, final_n: int) -> dict:
    """Train in chunks of ``chunk`` iterations until the stopping rule ends the run (or
    ``cfg.iterations``, or ``budget_s`` seconds of training); ``gain_ratio`` on ``eval_n``
    trajectories after each chunk (the same evaluation seeds each time; the final figure uses
    other seeds)."""
    task = make_task(problem, cfg)
    meta = {"domain": "toy2d", "spec": problem.spec, "w": list(cfg.w), "alpha": cfg.alpha,
            "base_sha256": base_hash(problem)}
    cfg.checkpoint_every = chunk
    points, train_s, done, last = [], 0.0, 0, {}
    while (done < cfg.iterations and not last.get("converged")
           and (budget_s is None or train_s < budget_s)):
        t0 = time.perf_counter()
        last = train(task, cfg, out, meta, resume=done > 0, overwrite=done == 0, progress=False,
                     stop_after=chunk)
        train_s += time.perf_counter() - t0
        done = last["iteration"]
        m = evaluate_expert(problem, task.policy, cfg.w, eval_n, cfg.seed, cfg.sample_steps)
        points.append({"iteration": done, "train_seconds": round(train_s, 1),
                       "gain_ratio": m["gain_ratio"], "gain_ratio_stderr": m["gain_ratio_stderr"]})
    final = evaluate_expert(problem, task.policy, cfg.w, final_n, cfg.seed + 1, cfg.sample_steps)
    return {"estimator": cfg.estimator, "kl_mode": cfg.kl_mode, "w": list(cfg.w),
            "iterations": done, "train_seconds": round(train_s, 1), "timeline": points,
            "final": final, "policy": task.policy}


def blend_comparison(problem: Toy2dProblem, learned: list, n: int, divisions: int = 10) -> list:
    """DB-MPA of the learned experts vs of the exact experts vs the exact target, over w."""
    exact = [problem.expert_denoiser(i) for i in range(problem.k)]
    rows = []
    for j in range(divisions + 1):
        w = (1 - j / divisions, j / divisions)
        pref = Preference(w)
        target, _ = problem.target(pref)
        row = {"w": list(w), "target": problem.expected_rewards(target)}
        for name, experts in (("learned", learned), ("exact", exact)):
            x0 = sample(BlendedDenoiser(None, experts, pref), problem.schedule,
                        seed_range(0, n), (problem.mixture.dim,)).x0
            row[name], row[name + "_stderr"] = mean_and_stderr(problem.rewards_of(x0.double()))
        rows.append(row)
    return rows


def bench_finetune_toy2d(spec: str = "bimodal-linear", out: str | Path = "bench-finetune-toy2d",
                         overwrite: bool = False, dpok_budget_s: float = 180.0,
                         eval_n: int = 4096,
                         final_n: int = 16384, blend_n: int = 8192, quick: bool = False) -> dict:
    """Run the whole benchmark; writes ``report.md`` and ``result.json`` into ``out``."""
    problem = load_problem(spec)
    out = prepare_out_dir(out, overwrite, "bench-finetune-toy2d")
    k = problem.k
    scale = dict(iterations=4, batch_size=32, sample_steps=None) if quick else {}
    runs, experts = [], []
    for i in range(k):
        w = tuple(1.0 if j == i else 0.0 for j in range(k))
        pw = timeline(problem, preset("toy2d-pathwise", w=w, **scale), out / f"pathwise_r{i + 1}",
                      None, 2 if quick else 25, eval_n, final_n)
        experts.append(pw.pop("policy").eval().requires_grad_(False))
        runs.append(pw)
        for name in ("toy2d-dpok",) + (("toy2d-dpok-published",) if i == 0 else ()):
            cfg = preset(name, w=w, **scale)
            run = timeline(problem, cfg, out / f"{name}_r{i + 1}", None, 2 if quick else 10,
                           eval_n, final_n)
            run.pop("policy")
            runs.append(run)
    rows = blend_comparison(problem, experts, 256 if quick else blend_n, 2 if quick else 10)
    result = {"spec": spec, "alpha": problem.alpha, "runs": runs, "blend": rows,
              "dpok_budget_s": dpok_budget_s}
    write_json(out / "result.json", result)
    write_text(out / "report.md", report(result))
    return summary(result)


def _reached(run: dict, ratio: float) -> dict | None:
    return next((p for p in run["timeline"] if p["gain_ratio"] >= ratio), None)


def summary(result: dict) -> dict:
    """The JSON the bench prints: per run its final gain ratio and when it got there."""
    runs = []
    for r in result["runs"]:
        f = r["final"]
        first95, first93 = _reached(r, 0.95), _reached(r, 0.93)
        runs.append({
            "estimator": r["estimator"], "kl_mode": r["kl_mode"], "w": r["w"],
            "iterations": r["iterations"], "train_seconds": r["train_seconds"],
            "gain_ratio": f["gain_ratio"], "gain_ratio_stderr": f["gain_ratio_stderr"],
            "first_iteration_at_0.95": first95 and first95["iteration"],
            "first_seconds_at_0.93": first93 and first93["train_seconds"],
            "min_gain_after_0.93": min((p["gain_ratio"] for p in r["timeline"]
                                        if first93 and p["iteration"] >= first93["iteration"]),
                                       default=None),
            "reached_0.93_within_budget": bool(first93 and first93["train_seconds"] <=
                                                result["dpok_budget_s"]),
            "mean_rewards": f["mean_rewards"], "target_mean_rewards": f["target_mean_rewards"],
            "path_kl": f["path_kl"], "target_kl": f["target_kl"],
        })
    gaps = [max(abs(a - b) for a, b in zip(row["learned"], row["exact"], strict=True))
            for row in result["blend"]]
    return {"spec": result["spec"], "runs": runs, "blend_max_abs_diff_learned_vs_exact":
            max(gaps)}


def report(result: dict) -> str:
    """Markdown tables for README: estimator runs, then the blend of learned experts."""
    lines = ["| estimator | w | iterations | train s | gain_ratio | first it. >= 0.95 | "
             "first s >= 0.93 | E[r] learned | E[r] target | path KL | KL(p*||p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary(result)["runs"]:
        name = r["estimator"] + (f" ({r['kl_mode']})" if r["estimator"] == "dpok" else "")
        w = r["w"]
        rw = sum(a * b for a, b in zip(w, r["mean_rewards"], strict=True))
        tw = sum(a * b for a, b in zip(w, r["target_mean_rewards"], strict=True))
        lines.append(f"| {name} | {w} | {r['iterations']} | {r['train_seconds']} | "
                     f"{r['gain_ratio']:.3f} ± {r['gain_ratio_stderr']:.3f} | "
                     f"{r['first_iteration_at_0.95']} | {r['first_seconds_at_0.93']} | "
                     f"{rw:.3f} | {tw:.3f} | {r['path_kl']:.3f} | {r['target_kl']:.3f} |")
    lines += ["", "| w | blend of learned experts E[r] | blend of exact experts E[r] | "
              "exact target E[r] |", "|---|---|---|---|"]
    for row in result["blend"]:
        cells = [", ".join(f"{v:.3f}" for v in row[key]) for key in ("learned", "exact", "target")]
        lines.append(f"| {row['w'][0]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
