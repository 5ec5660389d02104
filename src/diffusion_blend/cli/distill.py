"""``dblend distill digits|fashion|sd``: the amortised blend, one preference-conditioned adapter."""

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
    positive_float,
    positive_int,
    seed_int,
    threads,
)
from diffusion_blend.errors import UsageError


def cmd_images(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import image_domain
    from diffusion_blend.domains.images import load_base
    from diffusion_blend.finetune.distill_images import DistillConfig, run_distill
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    spec = image_domain(a.domain).spec
    cfg = DistillConfig(**({"iterations": a.iterations} if a.iterations is not None else {}))
    weights = Path(a.weights) if a.weights else spec.weights_dir
    load_base(spec, weights)    # missing or corrupt weights: error before anything is written
    if not a.resume:
        check_out_dir(a.out, a.overwrite, "distill")
    emit(run_distill(spec, weights, Path(a.out), cfg, a.resume, progress=not a.json,
                     overwrite=a.overwrite), a.json)


def cmd_sd(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.sd import read_prompts
    from diffusion_blend.finetune.distill_sd import SdDistillConfig, run_distill_sd
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    experts = [e for e in a.experts.split(",") if e]
    if not experts:
        raise UsageError("--experts: give one or more LoRA directories, comma-separated")
    for path in experts:
        if not Path(path).exists():
            raise UsageError(f"--experts: {path} does not exist (a LoRA directory)")
    cfg = SdDistillConfig(**{k: v for k, v in dict(
        iterations=a.iterations, batch_size=a.batch_size, steps=a.steps,
        guidance=a.guidance, lr=a.lr, lam_max=a.lam_max, seed=a.seed, height=a.height,
        width=a.width).items() if v is not None})
    read_prompts(a.prompts)                    # a missing or empty file: an error, first
    if not a.resume:
        check_out_dir(a.out, a.overwrite, "distill-sd")
    emit(run_distill_sd(a.model, experts, a.prompts, Path(a.out), cfg, a.resume, a.overwrite,
                        progress=not a.json), a.json)


def register(sub: Any) -> None:
    dom = domains(sub, "distill", "amortised blend: one preference-conditioned adapter")
    for name in ("digits", "fashion"):
        command(dom, name, cmd_images, f"distil DB-MPA / DB-KLA of the shipped {name} pair",
                OUT, arg("--weights", default=None, help="base + experts (default: shipped)"),
                arg("--iterations", type=positive_int, default=None),
                arg("--resume", action="store_true"), OVERWRITE).set_defaults(domain=name)
    command(dom, "sd", cmd_sd, "distil the blend of LoRA experts on a diffusers pipeline into "
            "one preference-conditioned LoRA (for sample sd --amortised)",
            arg("--model", required=True, help="local pipeline dir or cached hub id"),
            arg("--experts", required=True, help="LoRA dirs, comma-separated"),
            arg("--prompts", required=True, help="prompt file, one per line"), OUT,
            arg("--iterations", type=positive_int, default=None),
            arg("--batch-size", type=positive_int, default=None, help="prompts per iteration"),
            arg("--steps", type=positive_int, default=None, help="inference steps"),
            arg("--guidance", type=positive_float, default=None),
            arg("--lr", type=positive_float, default=None),
            arg("--lam-max", type=positive_float, default=None, help="lambda range [0, max]"),
            arg("--seed", type=seed_int, default=None),
            arg("--height", type=positive_int, default=None),
            arg("--width", type=positive_int, default=None),
            arg("--resume", action="store_true"), OVERWRITE)
