"""``dblend bench smc``: the SMC-corrected blend's error against the exact target as the number
of particles grows, next to the plain blend's (the Jensen gap), on one toy2d problem.

The same total number of particles for every P (``n // P`` independent runs, one output sample
each; the estimate is the mean of the runs' weighted estimates), so the standard error of each
estimate is comparable; the error is the Euclidean distance of the mean rewards
to the closed-form target, and ``log Z`` is compared with its closed form.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_blend.domains.toy2d import Toy2dDomain
from diffusion_blend.evaluation.methods import MethodConfig
from diffusion_blend.evaluation.sample import SampleConfig, run_sample
from diffusion_blend.io import prepare_out_dir, save_figure, write_json, write_text


def _error(summary: dict) -> float:
    return sum((a - b) ** 2 for a, b in zip(summary["mean_rewards"],
                                            summary["target_mean_rewards"], strict=True)) ** 0.5


def _stderr(summary: dict) -> float:
    return sum(e ** 2 for e in summary["stderr_rewards"]) ** 0.5


def bench_smc(spec: str = "bimodal-linear", w=(0.25, 0.75), n: int = 65536,
              particles=(16, 64, 256, 1024), steps: int = 1000, seed: int = 0,
              out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Rows for the plain blend and each P; a plot and a table in ``out`` when given."""
    domain = Toy2dDomain(spec, steps)
    blend, _ = run_sample(domain, SampleConfig("db-mpa", tuple(w), n=n, seed=seed))
    rows = [{"method": "blend", "particles": 1, "error": _error(blend),
             "error_stderr": _stderr(blend), "seconds": blend["seconds"]}]
    for p in particles:
        s, _ = run_sample(domain, SampleConfig("smc", tuple(w), n=n // p, seed=seed),
                          MethodConfig(smc_particles=p))
        rows.append({"method": "smc", "particles": p, "error": _error(s),
                     "error_stderr": _stderr(s), "log_z_estimate": s["log_z_estimate"],
                     "log_z_stderr": s["log_z_stderr"], "ess_min": s["ess_min"],
                     "resampling_count": s["resampling_count"], "seconds": s["seconds"]})
    result = {"spec": spec, "w": list(w), "n": n, "steps": steps,
              "target_mean_rewards": blend["target_mean_rewards"],
              "target_log_z": blend["target_log_z"], "rows": rows,
              "error_ratio_at_max_p": rows[-1]["error"] / rows[0]["error"]}
    if out is not None:
        out = prepare_out_dir(out, overwrite, "bench-smc")
        write_json(out / "smc.json", result)
        save_figure(_figure(result), out / "smc.png")
        write_text(out / "smc.md", _table(result))
    return result


def _figure(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smc = [r for r in result["rows"] if r["method"] == "smc"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([r["particles"] for r in smc], [r["error"] for r in smc],
                yerr=[r["error_stderr"] for r in smc], fmt="o-", label="SMC-corrected blend")
    ax.axhline(result["rows"][0]["error"], color="r", ls="--", label="plain blend")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("particles per run P")
    ax.set_ylabel("|mean rewards - exact target|")
    ax.set_title(f"{result['spec']}, w={result['w']}, {result['n']} particles in all", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _table(result: dict) -> str:
    lines = ["| method | P | error | ± (1 se) | log Z (closed form "
             f"{result['target_log_z']:.4f}) | min ESS | resamplings / run | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lz = f"{r['log_z_estimate']:.4f} ± {r['log_z_stderr']:.4f}" if "log_z_estimate" in r \
            else "-"
        lines.append(f"| {r['method']} | {r['particles']} | {r['error']:.4f} | "
                     f"{r['error_stderr']:.4f} | {lz} | {r.get('ess_min', float('nan')):.1f} | "
                     f"{r.get('resampling_count', 0):.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
