"""``dblend sample toy2d|digits|fashion|sd``: one method at one preference, with its summary; every
domain goes through the one dispatcher (``evaluation.sample.run_sample``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusion_blend.cli.args import (
    EXTRAPOLATE,
    SEED,
    SPACING,
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
from diffusion_blend.distributed import Dist
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import METHODS


def configs(a: argparse.Namespace):
    """The run's ``SampleConfig`` and ``MethodConfig`` (both validated on construction)."""
    from diffusion_blend.evaluation.methods import MethodConfig
    from diffusion_blend.evaluation.sample import SampleConfig

    cfg = SampleConfig(a.method, parse_floats(a.w, "--w") if a.w else None,
                       parse_finite(a.lam, "--lam"), a.allow_extrapolation, a.n, a.seed)
    mcfg = MethodConfig(a.sampler, a.eta, smc_particles=a.particles,
                        smc_ess_threshold=a.ess_threshold, smc_twist=a.twist)
    return cfg, mcfg


def cmd_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import Toy2dDomain, load_problem
    from diffusion_blend.evaluation.sample import run_sample
    from diffusion_blend.evaluation.toy2d import check_memory, save_sample_run
    from diffusion_blend.io import check_out_dir, prepare_out_dir

    threads(a.threads)
    cfg, mcfg = configs(a)
    problem = load_problem(a.spec)
    trained = [_trained(d, problem) for d in a.experts.split(",")] if a.experts else ()
    domain = Toy2dDomain(problem, a.steps, trained)
    cfg.preference(len(domain.experts))   # validate before writing anything
    check_memory(cfg.n * (mcfg.smc_particles if cfg.method == "smc" else 1), a.steps, problem)
    if a.out:
        check_out_dir(a.out, a.overwrite, "toy2d-sample")
    summary, x0 = run_sample(domain, cfg, mcfg, progress=not a.json)
    if not Dist().main:   # under accelerate launch, rank 0 writes what every rank gathered
        return
    pref = cfg.preference(len(domain.experts))
    summary |= {"sampler": mcfg.sampler, "target_coefficients": domain.coefficients(pref)}
    summary |= {"experts": a.experts.split(",")} if trained else {}
    check_result(summary)
    if a.out:
        config = asdict(cfg) | asdict(mcfg) | {"steps": a.steps, "experts": a.experts}
        save_sample_run(prepare_out_dir(a.out, a.overwrite, "toy2d-sample"), config, summary,
                        x0, domain)
    emit(summary, a.json)


def _trained(path: str, problem):
    from diffusion_blend.finetune.toy2d import load_expert

    return load_expert(path, problem)


def cmd_images(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import image_domain
    from diffusion_blend.evaluation.images_demo import save_sample_grid
    from diffusion_blend.evaluation.sample import run_sample
    from diffusion_blend.io import check_out_file

    threads(a.threads)
    kind = image_domain(a.domain)
    cls = kind.spec.check_class(a.cls)
    cfg, mcfg = configs(a)
    names = a.experts.split(",") if a.experts else list(kind.spec.pair)
    cfg.preference(len(names))                  # a bad w or lam: refused before models load
    if a.out:
        check_out_file(a.out, ".png")
    domain = kind(names, a.steps, weights_dir=Path(a.weights) if a.weights else None,
                  spacing=a.spacing)
    summary, x0 = run_sample(domain, cfg, mcfg, cond=domain.cond(range(a.seed, a.seed + a.n),
                                                                  cls))
    if not Dist().main:
        return
    summary |= {"class": cls, "experts": domain.names}
    check_result(summary)
    if a.out:
        save_sample_grid(x0, f"{kind.spec.classes[cls]}, w={summary['w']}, "
                         f"lam={summary['lam']}", a.out)
        summary["out"] = a.out
    emit(summary, a.json)


def cmd_sd(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.sd import SdDomain, read_prompts, save_image_row
    from diffusion_blend.evaluation.sample import run_sample
    from diffusion_blend.io import check_out_file

    experts = [e for e in (a.experts or "").split(",") if e] or amortised_experts(a.amortised)
    if not experts:
        raise UsageError("--experts: give one or more LoRA directories, comma-separated")
    a.method = a.method or ("amortised" if a.amortised else "db-mpa")
    prompts = read_prompts(a.prompts) if a.prompts else [a.prompt]
    cfg, mcfg = configs(a)
    cfg.preference(len(experts))
    guidance = parse_finite(a.guidance, "--guidance")
    check_size(a)
    check_out_file(a.out, ".png")
    domain = SdDomain(a.model, experts, prompts, steps=a.steps, guidance=guidance,
                      height=a.height, width=a.width, amortised=a.amortised)
    summary, x0 = run_sample(domain, cfg, mcfg, progress=not a.json)
    if not Dist().main:
        return
    save_image_row(domain.images(x0), a.out)
    emit(summary | {"model": a.model, "experts": experts, "prompts": prompts,
                    "guidance": guidance, "out": a.out}, a.json)


def amortised_experts(directory: str | None) -> list[str]:
    """The experts an amortised blend was distilled from (its JSON), for ``--amortised``
    without ``--experts``."""
    if not directory:
        return []
    from diffusion_blend.amortised import AMORTISED_FILE
    from diffusion_blend.io import read_json

    path = Path(directory) / AMORTISED_FILE
    if not path.with_suffix(".json").is_file():
        raise UsageError(f"--amortised {directory}: no {path.with_suffix('.json').name} there "
                         "(make it with `dblend distill sd`)")
    return [str(e) for e in read_json(path.with_suffix(".json"), "amortised metadata")["experts"]]


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


def method_args(default_n: int, method: str | None = "db-mpa") -> tuple:
    """The flags every domain's ``sample`` shares: method, preference, sampler, SMC, seeds."""
    return (arg("--method", default=method, choices=METHODS), *PREFERENCE,
            arg("--n", type=positive_int, default=default_n, help="output samples"), SEED,
            arg("--sampler", default="ddpm", choices=("ddpm", "ddim")),
            arg("--eta", type=finite_float, default=1.0, help="ddim: 0 deterministic"),
            arg("--particles", type=positive_int, default=64,
                help="smc: particles per output sample"),
            arg("--ess-threshold", type=finite_float, default=0.0,
                help="smc: resample when the ESS falls below this share (default 0: never)"),
            arg("--twist", action="store_true", help="smc: potentials on x0_hat along the "
                "chain (suits smooth rewards; biased at small P on images)"))


def register(sub: Any) -> None:
    dom = domains(sub, "sample", "sample one method at one preference")
    command(dom, "toy2d", cmd_toy2d, "the exact testbed: a method against the exact target",
            arg("--spec", default="bimodal", help="preset name or JSON spec path"),
            arg("--experts", default=None, help="fine-tuned expert dirs (default: the exact "
              "experts); one dir with --w 1 is that fine-tuned model"),
            *method_args(20000), arg("--steps", type=positive_int, default=1000),
            arg("--out", default=None), arg("--overwrite", action="store_true"))
    for name in ("digits", "fashion"):
        command(dom, name, cmd_images, f"a method with the shipped {name} experts",
                arg("--class", dest="cls", default="0", help="class index or name"),
                arg("--experts", default=None, help="expert names (default: the pair)"),
                *method_args(16), arg("--out", default=None, help="a .png of the images"),
                arg("--steps", type=positive_int, default=None,
                    help="sampling steps (default: the domain's)"),
                arg("--weights", default=None, help="base + experts (default: shipped)"),
                SPACING).set_defaults(domain=name)
    command(dom, "sd", cmd_sd, "a method on a local diffusers pipeline with LoRA experts",
            arg("--model", required=True, help="local pipeline dir or cached hub id"),
            arg("--experts", default=None, help="LoRA dirs, comma-separated"),
            arg("--prompt", default="a photo of an apple"), arg("--prompts", default=None),
            arg("--steps", type=positive_int, default=50), arg("--guidance", default="7.5"),
            arg("--amortised", default=None, help="a `dblend distill sd` output: the distilled "
                "blend (--method amortised, one network evaluation per step; --experts default "
                "to the ones it was distilled from)"),
            *method_args(1, None), *SIZE, arg("--out", default="sd.png"))
