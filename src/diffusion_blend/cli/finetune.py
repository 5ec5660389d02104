"""``dblend finetune toy2d|digits|fashion|sd``: experts by KL-regularised RL (pathwise or DPOK)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffusion_blend.cli.args import (
    OUT,
    OVERWRITE,
    SEED,
    SPACING,
    arg,
    command,
    domains,
    emit,
    parse_finite,
    parse_floats,
    positive_float,
    positive_int,
    threads,
)
from diffusion_blend.cli.sample import SIZE, check_size
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.config import FinetuneConfig

STOP = arg("--stop", default=None, choices=("budget", "plateau"),
           help="plateau (default): train until the objective stops "
                "improving beyond its noise (--iterations is then the upper bound)")
RUN = (arg("--iterations", type=positive_int, default=None, help="training iterations"),
       arg("--batch-size", type=positive_int, default=None, help="trajectories per iteration"),
       arg("--lr", type=positive_float, default=None),
       arg("--sample-steps", type=positive_int, default=None, help="chain length"),
       arg("--checkpoint-every", type=positive_int, default=None),
       arg("--preset", default=None, help="config preset (default DOMAIN-ESTIMATOR)"),
       STOP,
       arg("--eval-every", type=positive_int, default=None, help="plateau: iterations "
           "between evaluations"),
       arg("--patience", type=positive_int, default=None, help="plateau: evaluations per "
           "window (the last N against the N before them)"),
       arg("--min-progress", type=float, default=None, help="plateau: progress below this "
           "share of the gain so far does not count (default 0: off)"),
       SEED, OUT, arg("--resume", action="store_true"), OVERWRITE)


def toy2d_config(a: argparse.Namespace, k: int, spec_alpha: float) -> FinetuneConfig:
    """The resolved fine-tuning config: preset, then the flags given."""
    from diffusion_blend.finetune.config import preset

    name = a.preset or ("toy2d-dpok-published" if a.estimator == "dpok" and a.kl_mode ==
                        "published" else f"toy2d-{a.estimator}")
    w = parse_floats(a.w, "--w") if a.w else tuple(1.0 if i == 0 else 0.0 for i in range(k))
    alpha = parse_finite(a.alpha, "--alpha") if a.alpha is not None else spec_alpha
    return preset(name, estimator=a.estimator, kl_mode=a.kl_mode, w=w, alpha=alpha,
                  iterations=a.iterations, batch_size=a.batch_size, lr=a.lr,
                  sample_steps=a.sample_steps, eval_trajectories=a.eval_trajectories,
                  checkpoint_every=a.checkpoint_every, seed=a.seed, **stopping(a))


def stopping(a: argparse.Namespace) -> dict:
    """The stopping-rule flags given (the preset's values otherwise)."""
    return {"stop": a.stop, "eval_every": a.eval_every, "patience": a.patience,
            "min_progress": a.min_progress}


def cmd_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.finetune.toy2d import finetune_toy2d

    threads(a.threads)
    problem = load_problem(a.spec)
    cfg = toy2d_config(a, problem.k, problem.alpha)
    emit(finetune_toy2d(problem, cfg, a.out, a.resume, a.overwrite, progress=not a.json),
         a.json)


def cmd_images(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import image_domain
    from diffusion_blend.finetune.images import expert_specs, optional_experts, run_train_experts
    from diffusion_blend.io import check_out_folder

    threads(a.threads)
    spec = image_domain(a.domain).spec
    spec = replace(spec, spacing=a.spacing) if a.spacing else spec
    alpha = spec.alpha if a.alpha is None else a.alpha
    only = a.only.split(",") if a.only else None
    known = [e.name for e, _, _ in expert_specs(spec, alpha, optional_experts(spec, spec.rewards))]
    if only and any(n not in known for n in only):
        raise UsageError(f"--only {a.only}: names must be among {','.join(known)}")
    check_out_folder(a.out)
    done = run_train_experts(spec, Path(a.weights), Path(a.out), alpha, a.iterations,
                             progress=not a.json, only=only, stop=a.stop, steps=a.steps,
                             resume=a.resume)
    emit({name: {"eval": m["eval"], "train_seconds": m["train_seconds"]}
          for name, m in done.items()}, a.json)


def cmd_digits_conditioned(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.digits import SPEC
    from diffusion_blend.domains.images import load_base
    from diffusion_blend.finetune.conditioned_digits import train_conditioned
    from diffusion_blend.finetune.config import preset
    from diffusion_blend.io import check_out_folder

    threads(a.threads)
    cfg = preset("images-pathwise", alpha=SPEC.alpha if a.alpha is None else a.alpha,
                 iterations=a.iterations, stop="budget", sample_steps=SPEC.steps,
                 lr_schedule="cosine", checkpoint_every=50)
    load_base(SPEC, Path(a.weights))     # missing weights: an error before anything is written
    check_out_folder(a.out)
    meta = train_conditioned(Path(a.weights), Path(a.out), cfg, progress=not a.json,
                             resume=a.resume)
    emit({"train_seconds": meta["train_seconds"], "sha256": meta["sha256"]}, a.json)


def cmd_sd(a: argparse.Namespace) -> None:
    from diffusion_blend.finetune.config import preset
    from diffusion_blend.finetune.run import RUN_KIND
    from diffusion_blend.finetune.sd import finetune_sd
    from diffusion_blend.io import check_out_dir

    check_size(a)
    if not a.resume:   # before the pipeline loads
        check_out_dir(a.out, a.overwrite, RUN_KIND)
    cfg = preset(a.preset or f"sd-{a.estimator}", iterations=a.iterations,
                 batch_size=a.batch_size, sample_steps=a.sample_steps, lr=a.lr,
                 alpha=parse_finite(a.alpha, "--alpha") if a.alpha is not None else None,
                 seed=a.seed, mixed_precision=a.mixed_precision,
                 grad_accumulation=a.grad_accumulation, checkpoint_every=a.checkpoint_every,
                 **stopping(a))
    kwargs = {"model": a.reward_model} if a.reward_model else {}
    emit(finetune_sd(a.model, a.prompts, a.reward, cfg, a.out, kwargs,
                     parse_finite(a.guidance, "--guidance"), a.height, a.width, a.resume,
                     a.overwrite, progress=not a.json), a.json)


def register(sub: Any) -> None:
    dom = domains(sub, "finetune", "fine-tune experts (KL-regularised RL)")
    command(dom, "toy2d", cmd_toy2d, "on the exact testbed, against the analytic optimum",
            arg("--spec", default="bimodal"),
            arg("--w", default=None, help="reward weights of the expert, e.g. 1,0"),
            arg("--alpha", default=None, help="KL strength (default: the spec's alpha)"),
            arg("--estimator", default="pathwise", choices=("pathwise", "dpok")),
            arg("--kl-mode", default=None, choices=("to-go", "published"),
              help="DPOK returns (default to-go)"),
            arg("--eval-trajectories", type=positive_int, default=None), *RUN)
    for name in ("digits", "fashion"):
        command(dom, name, cmd_images, f"the {name} experts, MORL and DB-KLA adapters",
                arg("--weights", required=True, help="directory with base/classifier weights"),
                OUT, arg("--alpha", type=positive_float, default=None,
                         help="KL strength (default: the domain's)"),
                arg("--iterations", type=positive_int, default=None),
                arg("--only", default=None, help="comma-separated adapter names"),
                arg("--steps", type=positive_int, default=None, help="the chain trained on "
                    "(default: the domain's sampling steps)"),
                SPACING,
                arg("--resume", action="store_true", help="continue the runs a stopped "
                    "recipe left under OUT/runs (runs not begun start afresh)"),
                STOP).set_defaults(domain=name)
    command(dom, "digits-conditioned", cmd_digits_conditioned, "one preference-conditioned "
            "adapter of the digits pair trained directly (conditioned-rl: a preference per "
            "trajectory), saved like the amortised blend",
            arg("--weights", required=True, help="directory with base/classifier weights and "
                "experts/rewards.json"), OUT,
            arg("--alpha", type=positive_float, default=None,
                help="KL strength (default: the domain's, that of the experts)"),
            arg("--iterations", type=positive_int, default=600),
            arg("--resume", action="store_true"))
    command(dom, "sd", cmd_sd, "a LoRA expert for a local diffusers pipeline",
            arg("--model", required=True), arg("--prompts", required=True),
            arg("--reward", required=True, help="e.g. imagereward, pickscore, aesthetic"),
            arg("--reward-model", default=None, help="local weights of the reward model"),
            arg("--estimator", default="dpok", choices=("dpok", "pathwise")),
            arg("--alpha", default=None), arg("--guidance", default="7.5"), *SIZE,
            arg("--mixed-precision", default=None, choices=("no", "bf16", "fp16")),
            arg("--grad-accumulation", type=positive_int, default=None), *RUN)
