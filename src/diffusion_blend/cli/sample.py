"""``dblend sample toy2d|digits|sd``: one method at one preference, with its summary."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from diffusion_blend.cli.args import (
    EXTRAPOLATE,
    SEED,
    arg,
    check_result,
    command,
    domains,
    emit,
    finite_float,
    parse_finite,
    parse_floats,
    positive_int,
    threads,
)
from diffusion_blend.errors import UsageError

TOY2D_METHODS = ("pretrained", "exact", "db-mpa", "db-mpa-ls", "smc")


def cmd_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.evaluation.toy2d import (
        Toy2dSampleConfig,
        check_memory,
        run_sample,
        save_sample_run,
    )
    from diffusion_blend.io import check_out_dir, prepare_out_dir

    threads(a.threads)
    cfg = Toy2dSampleConfig(
        spec=a.spec, method=a.method, w=parse_floats(a.w, "--w") if a.w else None,
        lam=parse_finite(a.lam, "--lam"), n=a.n, steps=a.steps, sampler=a.sampler, eta=a.eta,
        seed=a.seed, allow_extrapolation=a.allow_extrapolation,
        experts=tuple(a.experts.split(",")) if a.experts else (), particles=a.particles,
        ess_threshold=a.ess_threshold)
    cfg.check()
    problem = load_problem(cfg.spec)
    experts = _learned_experts(cfg.experts, problem) if cfg.experts else None
    cfg.preference(len(experts) if experts else problem.k)  # validate before writing anything
    check_memory(cfg, problem)
    if a.out:
        check_out_dir(a.out, a.overwrite, "toy2d-sample")
    summary, x0 = run_sample(cfg, problem, progress=not a.json, learned=experts)
    check_result(summary)
    if a.out:
        save_sample_run(prepare_out_dir(a.out, a.overwrite, "toy2d-sample"), cfg, summary, x0,
                        problem)
    emit(summary, a.json)


def _learned_experts(dirs: Sequence[str], problem) -> list:
    from diffusion_blend.finetune.toy2d import load_expert

    return [load_expert(d, problem) for d in dirs]


def cmd_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.digits_demo import (
        grid_rows,
        image_grid,
        parse_class,
        run_sample,
    )
    from diffusion_blend.io import check_out_file, save_figure

    threads(a.threads)
    parse_class(a.cls)
    experts = a.experts.split(",")
    w = parse_floats(a.w, "--w") if a.w else (1.0 / len(experts),) * len(experts)
    if a.out:
        check_out_file(a.out, ".png")
    summary, x0 = run_sample(int(a.cls), w, parse_finite(a.lam, "--lam"), a.n, a.seed, experts,
                             a.allow_extrapolation)
    check_result(summary)
    if a.out:
        rows = grid_rows(x0)
        save_figure(image_grid(rows, [""] * len(rows), [""] * len(rows[0]),
                               f"digit {a.cls}, w={summary['w']}, lam={summary['lam']}"), a.out)
        summary["out"] = a.out
    emit(summary, a.json)


def cmd_sd(a: argparse.Namespace) -> None:
    from diffusion_blend.blend import Preference
    from diffusion_blend.domains.sd import read_prompts, sample_sd, save_image_row
    from diffusion_blend.io import check_out_file

    experts = [e for e in (a.experts or "").split(",") if e]
    if not experts:
        raise UsageError("--experts: give one or more LoRA directories, comma-separated")
    prompts = read_prompts(a.prompts) if a.prompts else [a.prompt]
    w = parse_floats(a.w, "--w") if a.w else (1.0 / len(experts),) * len(experts)
    pref = Preference.for_experts(w, len(experts), parse_finite(a.lam, "--lam"),
                                  a.allow_extrapolation)
    check_size(a)
    check_out_file(a.out, ".png")
    images, summary = sample_sd(a.model, experts, pref, prompts, a.steps,
                                parse_finite(a.guidance, "--guidance"), a.seed, a.n, a.height,
                                a.width)
    save_image_row(images, a.out)
    emit(summary | {"out": a.out}, a.json)


def check_size(a: argparse.Namespace) -> None:
    """Image sizes the latent chain can make (multiples of 8)."""
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and v % 8:
            raise UsageError(f"--{name} {v} is not allowed; use a multiple of 8")


SIZE = (arg("--height", type=positive_int, default=None),
        arg("--width", type=positive_int, default=None))
PREFERENCE = (arg("--w", default=None, help="weights, e.g. 0.3,0.7 (default uniform)"),
              arg("--lam", default="1.0", help="KL-strength modifier lambda >= 0"), EXTRAPOLATE)


def register(sub: Any) -> None:
    dom = domains(sub, "sample", "sample one method at one preference")
    command(dom, "toy2d", cmd_toy2d, "the exact testbed: a method against the exact target",
            arg("--spec", default="bimodal", help="preset name or JSON spec path"),
            arg("--method", default="db-mpa", choices=TOY2D_METHODS),
            arg("--experts", default=None, help="fine-tuned expert dirs (default: the exact "
              "experts); one dir with --w 1 is that fine-tuned model"),
            *PREFERENCE, arg("--n", type=positive_int, default=20000),
            arg("--steps", type=positive_int, default=1000),
            arg("--sampler", default="ddpm", choices=("ddpm", "ddim")),
            arg("--eta", type=finite_float, default=1.0), SEED,
            arg("--particles", type=positive_int, default=64, help="smc: particles per run"),
            arg("--ess-threshold", type=finite_float, default=0.5, help="smc: resample below"),
            arg("--out", default=None), arg("--overwrite", action="store_true"))
    command(dom, "digits", cmd_digits, "DB-MPA / DB-KLA with the shipped digits experts",
            arg("--class", dest="cls", default="0"), arg("--experts", default="ink,smooth"),
            *PREFERENCE, arg("--n", type=positive_int, default=16), SEED,
            arg("--out", default=None, help="a .png of the images"))
    command(dom, "sd", cmd_sd, "DB-MPA / DB-KLA on a local diffusers pipeline",
            arg("--model", required=True, help="local pipeline dir or cached hub id"),
            arg("--experts", required=True, help="LoRA dirs, comma-separated"), *PREFERENCE,
            arg("--prompt", default="a photo of an apple"), arg("--prompts", default=None),
            arg("--steps", type=positive_int, default=50), arg("--guidance", default="7.5"), SEED,
            arg("--n", type=positive_int, default=1), *SIZE, arg("--out", default="sd.png"))
