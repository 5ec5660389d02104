"""``dblend demo [fashion|digits|toy2d]`` (the reports a user sees first) and
``dblend gap toy2d``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffusion_blend.cli.args import (
    OVERWRITE,
    SEED,
    arg,
    check_result,
    command,
    domain_args,
    domains,
    emit,
    positive_int,
    resolve_domain,
    threads,
)

DEMO_OUT = {"fashion": "dblend-demo", "digits": "dblend-digits-demo",
            "toy2d": "dblend-toy2d-demo"}


def cmd_demo(a: argparse.Namespace) -> None:
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    resolve_domain(a, "fashion")
    out = a.out or DEMO_OUT[a.domain]
    check_out_dir(out, a.overwrite, f"{a.domain}-demo")
    if a.domain == "toy2d":
        from diffusion_blend.evaluation.toy2d import run_demo

        out = run_demo(out, a.overwrite)
        sys.stdout.write(f"wrote {out}/report.md with the Jensen-gap plots, tables and "
                         "scatter plots beside it\n")
        return
    from diffusion_blend.evaluation.images_demo import run_demo

    out = run_demo(a.domain, out, a.overwrite)
    sys.stdout.write(f"wrote {out}/report.md, grid_mpa.png, grid_kla.png and pareto.png\n")


def cmd_gap_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.evaluation.toy2d import run_gap, write_gap
    from diffusion_blend.io import check_out_dir, prepare_out_dir

    threads(a.threads)
    problem = load_problem(a.spec)
    check_out_dir(a.out, a.overwrite, "toy2d-gap")
    rows = run_gap(problem, a.n, a.steps, a.seed, a.divisions, progress=not a.json)
    check_result({"rows": rows})
    out = prepare_out_dir(a.out, a.overwrite, "toy2d-gap")
    write_gap(out, problem, rows)
    emit({"out": str(out), "rows": rows} if a.json else {"written": str(out / "gap.md")},
         a.json)


def register(sub: Any) -> None:
    command(sub, "demo", cmd_demo, "the first report to look at: grids, Pareto plot, tables",
            *domain_args(tuple(DEMO_OUT), "fashion"),
            arg("--out", default=None, help="default dblend-demo (digits: dblend-digits-demo, "
                "toy2d: dblend-toy2d-demo)"),
            OVERWRITE, json=False)
    dom = domains(sub, "gap", "the Jensen gap of the blend over a w grid")
    command(dom, "toy2d", cmd_gap_toy2d, "blend against the exact target, w over the simplex",
            arg("--spec", default="bimodal"), arg("--n", type=positive_int, default=10000),
            arg("--steps", type=positive_int, default=1000), SEED,
            arg("--divisions", type=positive_int, default=10), arg("--out", default="dblend-gap"),
            OVERWRITE)
