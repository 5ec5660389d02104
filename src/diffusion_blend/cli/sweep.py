"""``dblend sweep DOMAIN`` (every method over a w grid) and ``dblend report DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_blend.cli.args import (
    OUT,
    OVERWRITE,
    arg,
    command,
    domain_args,
    emit,
    parse_finite,
    parse_floats,
    positive_int,
    resolve_domain,
    seed_int,
    threads,
)
from diffusion_blend.errors import UsageError

if TYPE_CHECKING:
    from diffusion_blend.evaluation.sweep import SweepConfig


def sweep_config(a: argparse.Namespace) -> SweepConfig:
    """The ``SweepConfig`` of ``dblend sweep``'s flags."""
    from diffusion_blend.evaluation.methods import MethodConfig
    from diffusion_blend.evaluation.sweep import SweepConfig

    return SweepConfig(
        domain=a.domain, spec=a.spec, pair=tuple(a.pair.split(",")) if a.pair else None,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()), w_grid=a.w_grid,
        lam_grid=parse_floats(a.lam_grid, "--lam-grid"),
        gamma_grid=parse_floats(a.gamma_grid, "--gamma-grid"), seeds=a.seeds, seed=a.seed,
        steps=a.steps, match=not a.no_match, train_morl=a.train_morl, baselines=MethodConfig(
            code_n=a.code_n, code_block=a.code_block, smc_particles=a.particles,
            rgg_gamma=parse_finite(a.rgg_gamma, "--rgg-gamma"), rgg_normalise=not a.rgg_raw),
        sd=sd_part(a) if a.domain == "sd" else None)


def sd_part(a: argparse.Namespace) -> dict:
    """The sd part of a sweep config: the pipeline, the experts and their rewards."""
    from diffusion_blend.domains.sd import read_prompts

    if not (a.model and a.experts and a.rewards and a.prompts):
        raise UsageError("sweep sd needs --model, --experts, --rewards and --prompts")
    rewards = a.rewards.split(",")
    models = a.reward_models.split(",") if a.reward_models else [""] * len(rewards)
    if len(models) != len(rewards):
        raise UsageError(f"--reward-models has {len(models)} entries for {len(rewards)} rewards")
    morl = {}
    for item in filter(None, (a.morl or "").split(",")):
        w1, _, path = item.partition("=")
        morl[str(parse_finite(w1, "--morl"))] = path
    return {"model": a.model, "experts": a.experts.split(","), "rewards": rewards,
            "prompts": read_prompts(a.prompts), "guidance": parse_finite(a.guidance, "--guidance"),
            "reward_kwargs": [{"model": m} if m else {} for m in models], "morl": morl}


def reference(a: argparse.Namespace, k: int | None = None) -> tuple[float, ...] | None:
    """``--reference-point`` for the hypervolume, one value per reward."""
    if not a.reference_point:
        return None
    ref = parse_floats(a.reference_point, "--reference-point")
    if k is not None and len(ref) != k:
        raise UsageError(f"--reference-point {a.reference_point} has {len(ref)} values; the "
                         f"sweep has {k} rewards")
    return ref


def cmd_sweep(a: argparse.Namespace) -> None:
    from diffusion_blend.distributed import Dist
    from diffusion_blend.evaluation.report import check_reference, write_report
    from diffusion_blend.evaluation.sweep import check_sweep_out, run_sweep

    threads(a.threads)
    resolve_domain(a, "toy2d")
    cfg = sweep_config(a)
    cfg.check()
    ref = reference(a, cfg.k())
    check_reference(cfg.methods, ref)
    check_sweep_out(cfg, a.out, a.overwrite)
    out = run_sweep(cfg, a.out, a.overwrite, progress=not a.json)
    if not Dist().main:    # under accelerate launch, rank 0 reports the merged results
        return
    emit(write_report(out, ref) | {"out": str(out)}, a.json)


def cmd_report(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.report import write_report

    emit(write_report(a.dir, reference(a)) | {"report": str(Path(a.dir) / "report.md")}, a.json)


def register(sub: Any) -> None:
    from diffusion_blend.evaluation.methods import METHODS
    from diffusion_blend.evaluation.sweep import DEFAULT_METHODS, DOMAINS

    command(sub, "sweep", cmd_sweep, "every method over a w grid: results.jsonl + report",
            *domain_args(DOMAINS, "toy2d"),
            arg("--spec", default="bimodal", help="toy2d problem"),
            arg("--pair", default=None, help="image rewards, e.g. ink,smooth"),
            arg("--methods", default=",".join(DEFAULT_METHODS),
              help=f"comma-separated, of {','.join(METHODS)}"),
            arg("--w-grid", default="0:1:0.1", help="start:stop:step or a comma list"),
            arg("--lam-grid", default="0.5,1.5,2", help="DB-KLA and KL matching"),
            arg("--gamma-grid", default="0.01,0.03,0.1", help="RGG scales for KL matching"),
            arg("--seeds", type=positive_int, default=64),
            arg("--seed", type=seed_int, default=100_000_000),
            arg("--steps", type=positive_int, default=None), arg("--no-match", action="store_true"),
            arg("--train-morl", action="store_true", help="fine-tune missing MORL adapters"),
            arg("--code-n", type=positive_int, default=4),
            arg("--code-block", type=positive_int, default=None),
            arg("--particles", type=positive_int, default=8, help="smc: particles per output"),
            arg("--rgg-gamma", default="0.1"),
            arg("--rgg-raw", action="store_true", help="RGG without gradient normalisation"),
            arg("--reference-point", default=None),
            arg("--model", default=None, help="sd: local pipeline"),
            arg("--experts", default=None, help="sd: LoRA dirs, one per reward"),
            arg("--rewards", default=None, help="sd: reward names, e.g. imagereward,aesthetic"),
            arg("--reward-models", default=None, help="sd: local weights per reward"),
            arg("--prompts", default=None, help="sd: prompt file (held-out prompts)"),
            arg("--guidance", default="7.5"),
            arg("--morl", default=None, help="sd: W1=LORA_DIR,... MORL adapters"), OUT, OVERWRITE)
    command(sub, "report", cmd_report, "figures and report.md of a sweep directory",
            arg("dir"), arg("--reference-point", default=None))
