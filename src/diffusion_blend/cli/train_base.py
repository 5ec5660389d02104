"""``dblend train-base digits``: the base model and its classifiers (the domain's recipe)."""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_blend.cli.args import (
    OUT,
    OVERWRITE,
    SEED,
    arg,
    command,
    domains,
    emit,
    positive_int,
    threads,
)
from diffusion_blend.errors import UsageError


def cmd_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.digits import BaseConfig
    from diffusion_blend.evaluation.digits import run_train_base
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    cfg = BaseConfig(seed=a.seed, **({"iterations": a.iterations}
                                     if a.iterations is not None else {}))
    if cfg.iterations < 2:
        raise UsageError(f"--iterations {cfg.iterations} is not allowed; use >= 2")
    check_out_dir(a.out, a.overwrite, "digits-base")
    summary = run_train_base(a.out, cfg, a.overwrite, progress=not a.json)
    emit({"out": summary["out"], "seconds": summary["seconds"],
          "quality": summary["base"]["quality"]}, a.json)


def register(sub: Any) -> None:
    dom = domains(sub, "train-base", "train a domain's base model (and its classifiers)")
    command(dom, "digits", cmd_digits, "the digits UNet, reward classifier and judge", OUT,
            arg("--iterations", type=positive_int, default=None), SEED, OVERWRITE)
