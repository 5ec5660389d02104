"""``dblend train-base DOMAIN``: an image domain's base model and its classifiers (the recipe,
checkpointed and resumable)."""

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


def run(a: argparse.Namespace, spec) -> None:
    from diffusion_blend.domains.images import BaseConfig
    from diffusion_blend.evaluation.images import check_resumable, run_train_base
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    cfg = BaseConfig(**(spec.base_config | {"seed": a.seed}
                        | ({"iterations": a.iterations} if a.iterations is not None else {})))
    if a.resume:
        check_resumable(a.out, f"{spec.name}-base")
    else:
        check_out_dir(a.out, a.overwrite, f"{spec.name}-base")
    spec.load_data()          # missing data: the one-line message before anything is written
    summary = run_train_base(spec, a.out, cfg, a.overwrite, a.resume, progress=not a.json)
    emit({"out": summary["out"], "seconds": summary["seconds"],
          "quality": summary["base"]["quality"]}, a.json)


def cmd_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.digits import SPEC

    run(a, SPEC)


def cmd_fashion(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import fashion

    run(a, fashion.spec(a.data))


def register(sub: Any) -> None:
    dom = domains(sub, "train-base", "train a domain's base model (and its classifiers)")
    common = (OUT, arg("--iterations", type=positive_int, default=None), SEED, OVERWRITE,
              arg("--resume", action="store_true", help="continue a stopped run in --out"))
    command(dom, "digits", cmd_digits, "the digits UNet, reward classifier and judge", *common)
    command(dom, "fashion", cmd_fashion, "the fashion UNet (16 px), reward classifier and judge",
            *common, arg("--data", default=None, help="directory of the Fashion-MNIST IDX "
                         "files (default: Debian's /usr/share/datasets/fashion-mnist)"))
