"""``dblend distill digits``: the amortised blend, one preference-conditioned adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffusion_blend.cli.args import (
    OUT,
    OVERWRITE,
    arg,
    command,
    domains,
    emit,
    positive_int,
    threads,
)


def cmd_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import digits
    from diffusion_blend.finetune.distill_digits import DistillConfig, run_distill
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    cfg = DistillConfig(**({"iterations": a.iterations} if a.iterations is not None else {}))
    weights = Path(a.weights) if a.weights else digits.WEIGHTS_DIR
    digits.load_base(weights)     # missing or corrupt weights: error before anything is written
    if not a.resume:
        check_out_dir(a.out, a.overwrite, "distill")
    emit(run_distill(weights, Path(a.out), cfg, a.resume, progress=not a.json,
                     overwrite=a.overwrite), a.json)


def register(sub: Any) -> None:
    dom = domains(sub, "distill", "amortised blend: one preference-conditioned adapter")
    command(dom, "digits", cmd_digits, "distil DB-MPA / DB-KLA of the shipped pair", OUT,
            arg("--weights", default=None, help="base + experts (default: shipped)"),
            arg("--iterations", type=positive_int, default=None),
            arg("--resume", action="store_true"), OVERWRITE)
