"""``dblend``: the command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion_blend.errors import UsageError

log = logging.getLogger("diffusion_blend")


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """``"0.3,0.7"`` -> ``(0.3, 0.7)``; anything else is a ``UsageError`` naming the flag."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} {text!r}: give comma-separated numbers, e.g. 0.3,0.7") from None
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"{name} {text!r} contains NaN or inf; values must be finite")
    return vals


def parse_finite(text: str, name: str) -> float:
    """One finite number, or a ``UsageError`` naming the flag."""
    vals = parse_floats(text, name)
    if len(vals) != 1:
        raise UsageError(f"{name} {text!r}: give one number")
    return vals[0]


def _emit(obj: dict, as_json: bool) -> None:
    from diffusion_blend.io import check_finite_json, dumps

    check_finite_json(obj, "the result")
    if as_json:
        sys.stdout.write(dumps(obj) + "\n")
    else:
        for k, v in obj.items():
            sys.stdout.write(f"{k}: {v}\n")


# ---------------------------------------------------------------------------- argument types
# argparse calls these on the raw text; a ValueError/ArgumentTypeError becomes one line, exit 2.

MAX_SEED = 2**64


def finite_float(text: str) -> float:
    """A finite number (``inf`` and ``nan`` are refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; give a finite number")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (zero means zero, and zero of these is never allowed)."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; use a whole number >= 1")
    return v


def seed_int(text: str) -> int:
    """A seed: 0 <= seed < 2**64 (larger seeds would alias smaller ones)."""
    v = _int(text)
    if not 0 <= v < MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; seeds are 0 ... 2**64 - 1")
    return v


def port_int(text: str) -> int:
    v = _int(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; use 1 ... 65535")
    return v


class VersionAction(argparse.Action):
    """``--version``: one unwrapped line on stdout, then exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(versions() + "\n")
        parser.exit(0)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _threads(n: int | None) -> None:
    """Small toy2d tensors run fastest on one thread on these machines (OpenMP wake-up costs)."""
    import torch

    torch.set_num_threads(n or 1)


# ---------------------------------------------------------------------------- toy2d


def _add_toy2d_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="bimodal", help="preset name or JSON spec path")
    p.add_argument("--method", default="blend",
                   choices=("pretrained", "blend", "blend-ls", "exact", "finetuned", "smc"))
    p.add_argument("--particles", type=positive_int, default=64, help="smc: particles per run")
    p.add_argument("--ess-threshold", type=finite_float, default=0.5,
                   help="smc: resample below")
    p.add_argument("--w", default=None, help="weights, e.g. 0.3,0.7 (default uniform)")
    p.add_argument("--lam", default="1.0", help="KL-strength modifier lambda >= 0")
    p.add_argument("--n", type=positive_int, default=20000)
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--eta", type=finite_float, default=1.0)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--experts", default=None, help="learned expert dirs, comma-separated")
    p.add_argument("--allow-extrapolation", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true")


def cmd_toy2d_sample(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.evaluation.toy2d import (
        Toy2dSampleConfig,
        check_memory,
        run_sample,
        save_sample_run,
    )
    from diffusion_blend.io import check_out_dir, prepare_out_dir

    _threads(a.threads)
    cfg = Toy2dSampleConfig(
        spec=a.spec, method=a.method, w=parse_floats(a.w, "--w") if a.w else None,
        lam=parse_finite(a.lam, "--lam"), n=a.n, steps=a.steps, sampler=a.sampler, eta=a.eta,
        seed=a.seed, allow_extrapolation=a.allow_extrapolation,
        experts=tuple(a.experts.split(",")) if a.experts else (), particles=a.particles,
        ess_threshold=a.ess_threshold,
    )
    cfg.check()
    problem = load_problem(cfg.spec)
    experts = _load_learned_experts(cfg.experts, problem) if cfg.experts else None
    cfg.preference(len(experts) if experts else problem.k)  # validate before writing anything
    check_memory(cfg, problem)
    if a.out:
        check_out_dir(a.out, a.overwrite, "toy2d-sample")
    summary, x0 = run_sample(cfg, problem, progress=not a.json, learned=experts)
    _check_result(summary)
    if a.out:
        save_sample_run(prepare_out_dir(a.out, a.overwrite, "toy2d-sample"), cfg, summary, x0,
                        problem)
    _emit(summary, a.json)


def _check_result(summary: dict) -> None:
    """A result with NaN or infinite numbers is an error, never printed or saved."""
    from diffusion_blend.io import check_finite_json

    check_finite_json(summary, "the result")


def _load_learned_experts(dirs: Sequence[str], problem):
    from diffusion_blend.finetune.toy2d import load_expert

    return [load_expert(d, problem) for d in dirs]


def cmd_toy2d_gap(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.evaluation.toy2d import run_gap, write_gap
    from diffusion_blend.io import check_out_dir, prepare_out_dir

    _threads(a.threads)
    problem = load_problem(a.spec)
    check_out_dir(a.out, a.overwrite, "toy2d-gap")
    rows = run_gap(problem, a.n, a.steps, a.seed, a.divisions, progress=not a.json)
    _check_result({"rows": rows})
    out = prepare_out_dir(a.out, a.overwrite, "toy2d-gap")
    write_gap(out, problem, rows)
    _emit({"out": str(out), "rows": rows} if a.json else {"written": str(out / "gap.md")}, a.json)


# ---------------------------------------------------------------------------- finetune


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="bimodal")
    p.add_argument("--w", default=None, help="reward weights of the expert, e.g. 1,0")
    p.add_argument("--alpha", default=None, help="KL strength (default: the spec's alpha)")
    p.add_argument("--estimator", default="pathwise", choices=("pathwise", "dpok"))
    p.add_argument("--kl-mode", default=None, choices=("to-go", "published"),
                   help="DPOK returns (default to-go)")
    p.add_argument("--preset", default=None, help="config preset (default toy2d-ESTIMATOR)")
    p.add_argument("--steps", type=positive_int, default=None, help="training iterations")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="chain length (default T)")
    p.add_argument("--eval-trajectories", type=positive_int, default=None)
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")


def finetune_config_from_args(a: argparse.Namespace, k: int, spec_alpha: float):
    """The resolved fine-tuning config: preset, then the flags given."""
    from diffusion_blend.finetune.config import ESTIMATORS, preset

    if a.estimator not in ESTIMATORS:
        raise UsageError(f"--estimator {a.estimator!r} is not known; use one of {ESTIMATORS}")
    name = a.preset or ("toy2d-dpok-published" if a.estimator == "dpok" and a.kl_mode ==
                        "published" else f"toy2d-{a.estimator}")
    w = parse_floats(a.w, "--w") if a.w else tuple(1.0 if i == 0 else 0.0 for i in range(k))
    alpha = parse_finite(a.alpha, "--alpha") if a.alpha is not None else spec_alpha
    if a.seed < 0:
        raise UsageError(f"--seed {a.seed} is not allowed; use >= 0")
    return preset(name, estimator=a.estimator, kl_mode=a.kl_mode, w=w, alpha=alpha,
                  iterations=a.steps, batch_size=a.batch_size, lr=a.lr,
                  sample_steps=a.sample_steps, eval_trajectories=a.eval_trajectories,
                  checkpoint_every=a.checkpoint_every, seed=a.seed)


def cmd_finetune_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.finetune.toy2d import finetune_toy2d

    _threads(a.threads)
    problem = load_problem(a.spec)
    cfg = finetune_config_from_args(a, problem.k, problem.alpha)
    result = finetune_toy2d(problem, cfg, a.out, a.resume, a.overwrite, progress=not a.json)
    _emit(result, a.json)


# ---------------------------------------------------------------------------- bench, demo


def cmd_bench_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.toy2d import bench_toy2d

    _threads(a.threads)
    _emit(bench_toy2d(n=a.n, steps=a.steps, numpy_reference=not a.no_reference), a.json)


def cmd_bench_finetune_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.finetune_toy2d import bench_finetune_toy2d
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    load_problem(a.spec)
    check_out_dir(a.out, a.overwrite, "bench-finetune-toy2d")
    _emit(bench_finetune_toy2d(a.spec, a.out, a.overwrite, dpok_budget_s=a.dpok_seconds,
                               quick=a.quick), a.json)


def cmd_bench_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.digits import bench_digits

    _threads(a.threads)
    _emit(bench_digits(a.n), a.json)


def cmd_bench_sd_memory(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.sd_memory import bench_sd_memory

    _emit(bench_sd_memory(a.config, a.experts, a.batch, a.rank, a.repeats), a.json)


def cmd_bench_smc(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.smc import bench_smc
    from diffusion_blend.blend import Preference
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    ps = parse_floats(a.particles, "--particles")
    if any(p < 1 or p != int(p) or a.n % int(p) for p in ps):
        raise UsageError(f"--particles {a.particles}: whole numbers >= 1 that divide --n {a.n}")
    w = parse_floats(a.w, "--w")
    Preference.for_experts(w, load_problem(a.spec).k)
    if a.out:
        check_out_dir(a.out, a.overwrite, "bench-smc")
    _emit(bench_smc(a.spec, w, a.n, tuple(int(p) for p in ps), a.steps, a.seed, a.out,
                    a.overwrite), a.json)


def cmd_distill_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.domains import digits
    from diffusion_blend.finetune.distill_digits import DistillConfig, run_distill
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    cfg = DistillConfig(**({"iterations": a.iterations} if a.iterations is not None else {}))
    weights = Path(a.weights) if a.weights else digits.WEIGHTS_DIR
    digits.load_base(weights)     # missing or corrupt weights: error before anything is written
    if not a.resume:
        check_out_dir(a.out, a.overwrite, "distill")
    _emit(run_distill(weights, Path(a.out), cfg, a.resume, progress=not a.json,
                      overwrite=a.overwrite), a.json)


def cmd_ui(a: argparse.Namespace) -> None:
    from diffusion_blend.io import check_out_folder
    from diffusion_blend.ui import bind_server, run_ui

    _threads(a.threads)
    experts = [e for e in (a.experts or "").split(",") if e] or None
    if a.sd_model and not experts:
        raise UsageError("--sd-model needs --experts (LoRA directories)")
    check_out_folder(a.out)
    httpd = bind_server(a.host, a.port)   # a port in use is an error before models load
    server = run_ui(experts, a.out, a.host, a.port, a.sd_model, a.allow_extrapolation, a.steps,
                    httpd=httpd)
    sys.stderr.write(f"dblend ui: serving {server.url} (Ctrl-C stops)\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def cmd_toy2d_demo(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.toy2d import run_demo
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    check_out_dir(a.out, a.overwrite, "toy2d-demo")
    out = run_demo(a.out, a.overwrite)
    sys.stdout.write(f"wrote {out}/report.md with the Jensen-gap plots, tables and scatter "
                     "plots beside it\n")


def cmd_demo(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.digits_demo import run_demo
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    check_out_dir(a.out, a.overwrite, "digits-demo")
    out = run_demo(a.out, a.overwrite)
    sys.stdout.write(f"wrote {out}/report.md, grid_mpa.png, grid_kla.png and pareto.png\n")


# ---------------------------------------------------------------------------- digits


def cmd_digits_train_base(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.digits import BaseConfig
    from diffusion_blend.evaluation.digits import run_train_base
    from diffusion_blend.io import check_out_dir

    _threads(a.threads)
    cfg = BaseConfig(seed=a.seed, **({"iterations": a.iterations}
                                     if a.iterations is not None else {}))
    if cfg.iterations < 2:
        raise UsageError(f"--iterations {cfg.iterations} is not allowed; use >= 2")
    check_out_dir(a.out, a.overwrite, "digits-base")
    summary = run_train_base(a.out, cfg, a.overwrite, progress=not a.json)
    _emit({"out": summary["out"], "seconds": summary["seconds"],
           "quality": summary["base"]["quality"]}, a.json)


def cmd_digits_train_experts(a: argparse.Namespace) -> None:
    from diffusion_blend.finetune.digits import expert_specs, run_train_experts
    from diffusion_blend.io import check_out_folder

    _threads(a.threads)
    only = a.only.split(",") if a.only else None
    known = [spec.name for spec, _, _ in expert_specs(a.alpha)]
    if only and any(n not in known for n in only):
        raise UsageError(f"--only {a.only}: names must be among {','.join(known)}")
    check_out_folder(a.out)
    done = run_train_experts(Path(a.weights), Path(a.out), a.alpha, a.iterations,
                             progress=not a.json, only=only)
    _emit({name: {"eval": m["eval"], "train_seconds": m["train_seconds"]}
           for name, m in done.items()}, a.json)


def cmd_sample_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.digits_demo import (
        grid_rows,
        image_grid,
        parse_class,
        run_sample,
    )
    from diffusion_blend.io import check_out_file, save_figure

    _threads(a.threads)
    parse_class(a.cls)
    experts = a.experts.split(",")
    w = parse_floats(a.w, "--w") if a.w else (1.0 / len(experts),) * len(experts)
    if a.out:
        check_out_file(a.out, ".png")
    x0, summary = run_sample(int(a.cls), w, parse_finite(a.lam, "--lam"), a.n, a.seed, experts,
                             a.allow_extrapolation)
    _check_result(summary)
    if a.out:
        rows = grid_rows(x0)
        save_figure(image_grid(rows, [""] * len(rows), [""] * len(rows[0]),
                               f"digit {a.cls}, w={summary['w']}, lam={summary['lam']}"), a.out)
        summary["out"] = a.out
    _emit(summary, a.json)


# ---------------------------------------------------------------------------- sd


def cmd_sample_sd(a: argparse.Namespace) -> None:
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
    _check_size(a)
    check_out_file(a.out, ".png")
    images, summary = sample_sd(a.model, experts, pref, prompts, a.steps,
                                parse_finite(a.guidance, "--guidance"), a.seed, a.n, a.height,
                                a.width)
    save_image_row(images, a.out)
    _emit(summary | {"out": a.out}, a.json)


def _check_size(a: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and v % 8:
            raise UsageError(f"--{name} {v} is not allowed; use a multiple of 8")


def cmd_finetune_sd(a: argparse.Namespace) -> None:
    from diffusion_blend.finetune.config import preset
    from diffusion_blend.finetune.run import RUN_KIND
    from diffusion_blend.finetune.sd import finetune_sd
    from diffusion_blend.io import check_out_dir

    _check_size(a)
    if not a.resume:   # before the pipeline loads
        check_out_dir(a.out, a.overwrite, RUN_KIND)
    cfg = preset(a.preset or f"sd-{a.estimator}", iterations=a.iterations,
                 batch_size=a.batch_size, sample_steps=a.sample_steps, lr=a.lr,
                 alpha=parse_finite(a.alpha, "--alpha") if a.alpha is not None else None,
                 seed=a.seed, mixed_precision=a.mixed_precision,
                 grad_accumulation=a.grad_accumulation, checkpoint_every=a.checkpoint_every)
    kwargs = {"model": a.reward_model} if a.reward_model else {}
    result = finetune_sd(a.model, a.prompts, a.reward, cfg, a.out, kwargs,
                         parse_finite(a.guidance, "--guidance"), a.height, a.width, a.resume,
                         a.overwrite, progress=not a.json)
    _emit(result, a.json)


def _sd_commands(sub, sample_sub, finetune_sub) -> None:
    size = (A("--height", type=positive_int, default=None),
            A("--width", type=positive_int, default=None))
    _command(sample_sub, "sd", cmd_sample_sd, "DB-MPA / DB-KLA on a local diffusers pipeline",
             A("--model", required=True, help="local pipeline dir or cached hub id"),
             A("--experts", required=True, help="LoRA dirs, comma-separated"),
             A("--w", default=None), A("--lam", default="1.0"),
             A("--prompt", default="a photo of an apple"), A("--prompts", default=None),
             A("--steps", type=positive_int, default=50), A("--guidance", default="7.5"),
             A("--seed", type=seed_int, default=0), A("--n", type=positive_int, default=1), *size,
             A("--allow-extrapolation", action="store_true"), A("--out", default="sd.png"))
    _command(finetune_sub, "sd", cmd_finetune_sd, "a LoRA expert for a diffusers pipeline",
             A("--model", required=True), A("--prompts", required=True),
             A("--reward", required=True, help="e.g. imagereward, pickscore, aesthetic"),
             A("--reward-model", default=None, help="local weights of the reward model"),
             A("--estimator", default="dpok", choices=("dpok", "pathwise")),
             A("--preset", default=None), A("--iterations", type=positive_int, default=None),
             A("--batch-size", type=positive_int, default=None),
             A("--sample-steps", type=positive_int, default=None),
             A("--lr", type=positive_float, default=None), A("--alpha", default=None),
             A("--guidance", default="7.5"), *size,
             A("--mixed-precision", default=None, choices=("no", "bf16", "fp16")),
             A("--grad-accumulation", type=positive_int, default=None),
             A("--checkpoint-every", type=positive_int, default=None),
             A("--seed", type=seed_int, default=0),
             OUT, A("--resume", action="store_true"), OVERWRITE)


# ---------------------------------------------------------------------------- sweeps


def sweep_config(a: argparse.Namespace):
    """The ``SweepConfig`` of ``dblend sweep``'s flags."""
    from diffusion_blend.evaluation.methods import MethodConfig
    from diffusion_blend.evaluation.sweep import SweepConfig

    lams = parse_floats(a.lam_grid, "--lam-grid")
    return SweepConfig(
        domain=a.domain, spec=a.spec, pair=tuple(a.pair.split(",")) if a.pair else None,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()), w_grid=a.w_grid,
        lam_grid=lams, gamma_grid=parse_floats(a.gamma_grid, "--gamma-grid"), seeds=a.seeds,
        seed=a.seed, steps=a.steps, match=not a.no_match,
        train_morl=a.train_morl, baselines=MethodConfig(
            code_n=a.code_n, code_block=a.code_block, smc_particles=a.particles,
            rgg_gamma=parse_finite(a.rgg_gamma, "--rgg-gamma"), rgg_normalise=not a.rgg_raw),
        sd=_sd_sweep(a) if a.domain == "sd" else None)


def _sd_sweep(a: argparse.Namespace) -> dict:
    """The sd part of a sweep config: the pipeline, the experts and their rewards."""
    from diffusion_blend.domains.sd import read_prompts

    if not (a.model and a.experts and a.rewards and a.prompts):
        raise UsageError("--domain sd needs --model, --experts, --rewards and --prompts")
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


def cmd_sweep(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.report import write_report
    from diffusion_blend.evaluation.sweep import check_sweep_out, run_sweep

    _threads(a.threads)
    cfg = sweep_config(a)
    cfg.check()
    ref = _reference(a, cfg.k())
    check_sweep_out(cfg, a.out, a.overwrite)
    out = run_sweep(cfg, a.out, a.overwrite, progress=not a.json)
    summary = write_report(out, ref)
    _emit(summary | {"out": str(out)}, a.json)


def _reference(a: argparse.Namespace, k: int | None = None):
    if not a.reference_point:
        return None
    ref = parse_floats(a.reference_point, "--reference-point")
    if k is not None and len(ref) != k:
        raise UsageError(f"--reference-point {a.reference_point} has {len(ref)} values; the "
                         f"sweep has {k} rewards")
    return ref


def cmd_report(a: argparse.Namespace) -> None:
    from diffusion_blend.evaluation.report import write_report

    summary = write_report(a.dir, _reference(a))
    _emit(summary | {"report": str(Path(a.dir) / "report.md")}, a.json)


def cmd_convert_lora(a: argparse.Namespace) -> None:
    from diffusion_blend.convert import convert_lora

    _emit(convert_lora(a.old_dir, a.new_dir, a.overwrite), a.json)


def _sweep_commands(sub) -> None:
    from diffusion_blend.evaluation.sweep import DEFAULT_METHODS, DOMAINS

    _command(sub, "sweep", cmd_sweep, "every method over a w grid: results.jsonl + report",
             A("--domain", default="toy2d", choices=DOMAINS),
             A("--spec", default="bimodal", help="toy2d problem"),
             A("--pair", default=None, help="digits rewards, e.g. ink,smooth"),
             A("--methods", default=",".join(DEFAULT_METHODS)),
             A("--w-grid", default="0:1:0.1", help="start:stop:step or a comma list"),
             A("--lam-grid", default="0.5,1.5,2", help="DB-KLA and KL matching"),
             A("--gamma-grid", default="0.01,0.03,0.1", help="RGG scales for KL matching"),
             A("--seeds", type=positive_int, default=64),
             A("--seed", type=seed_int, default=100_000_000),
             A("--steps", type=positive_int, default=None), A("--no-match", action="store_true"),
             A("--train-morl", action="store_true", help="fine-tune missing MORL adapters"),
             A("--code-n", type=positive_int, default=4),
             A("--code-block", type=positive_int, default=None),
             A("--particles", type=positive_int, default=8, help="smc: particles per output"),
             A("--rgg-gamma", default="0.1"),
             A("--rgg-raw", action="store_true", help="RGG without gradient normalisation"),
             A("--reference-point", default=None),
             A("--model", default=None, help="sd: local pipeline"),
             A("--experts", default=None, help="sd: LoRA dirs, one per reward"),
             A("--rewards", default=None, help="sd: reward names, e.g. imagereward,aesthetic"),
             A("--reward-models", default=None, help="sd: local weights per reward"),
             A("--prompts", default=None, help="sd: prompt file (held-out prompts)"),
             A("--guidance", default="7.5"), A("--morl", default=None,
                                               help="sd: W1=LORA_DIR,... MORL adapters"),
             OUT, OVERWRITE)
    _command(sub, "convert-lora", cmd_convert_lora,
             "legacy Diffusion Blend / DPOK LoRA (diffusers 0.14) -> PEFT safetensors",
             A("old_dir"), A("new_dir"), OVERWRITE)
    _command(sub, "report", cmd_report, "figures and report.md of a sweep directory",
             A("dir"), A("--reference-point", default=None))


# ---------------------------------------------------------------------------- parser


def A(*flags: str, **kw) -> tuple:
    """One argument spec: ``A("--n", type=int, default=10)``."""
    return flags, kw


OUT = A("--out", required=True)
OVERWRITE = A("--overwrite", action="store_true")


def _command(sub, name: str, func, help: str, *specs: tuple, json: bool = True):
    """A subcommand with its arguments, plus ``--threads`` (and ``--json``) on every one."""
    p = sub.add_parser(name, help=help)
    for flags, kw in specs:
        p.add_argument(*flags, **kw)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default 1)")
    if json:
        p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=func)
    return p


def _toy2d_commands(sub) -> None:
    toy = sub.add_parser("toy2d", help="the exact Gaussian-mixture testbed").add_subparsers(
        dest="toy2d_command", required=True)
    s = _command(toy, "sample", cmd_toy2d_sample, "sample one method, compare with the target")
    _add_toy2d_sample_args(s)
    _command(toy, "gap", cmd_toy2d_gap, "sweep w and measure the Jensen gap",
             A("--spec", default="bimodal"), A("--n", type=positive_int, default=10000),
             A("--steps", type=positive_int, default=1000), A("--seed", type=seed_int, default=0),
             A("--divisions", type=positive_int, default=10), A("--out", default="dblend-gap"),
             OVERWRITE)
    _command(toy, "demo", cmd_toy2d_demo, "the toy2d Jensen-gap report",
             A("--out", default="dblend-toy2d-demo"), OVERWRITE, json=False)


def _digits_commands(sub):
    dg = sub.add_parser("digits", help="the digits domain recipes").add_subparsers(
        dest="digits_command", required=True)
    _command(dg, "train-base", cmd_digits_train_base, "train the base model and classifiers",
             OUT, A("--iterations", type=positive_int, default=None),
             A("--seed", type=seed_int, default=0), OVERWRITE)
    _command(dg, "train-experts", cmd_digits_train_experts,
             "fine-tune the LoRA experts, MORL and DB-KLA runs",
             A("--weights", required=True, help="directory with base/classifier weights"), OUT,
             A("--alpha", type=positive_float, default=0.5),
             A("--iterations", type=positive_int, default=None),
             A("--only", default=None, help="comma-separated expert names"))
    ds = sub.add_parser("distill", help="amortised blend: one preference-conditioned adapter")
    _command(ds.add_subparsers(dest="distill_domain", required=True), "digits",
             cmd_distill_digits, "distil DB-MPA / DB-KLA of the shipped pair", OUT,
             A("--weights", default=None, help="base + experts (default: shipped)"),
             A("--iterations", type=positive_int, default=None),
             A("--resume", action="store_true"), OVERWRITE)
    smp = sub.add_parser("sample", help="one-off sampling").add_subparsers(
        dest="sample_domain", required=True)
    _command(smp, "digits", cmd_sample_digits, "DB-MPA / DB-KLA with the shipped experts",
             A("--class", dest="cls", default="0"), A("--experts", default="ink,smooth"),
             A("--w", default=None), A("--lam", default="1.0"),
             A("--n", type=positive_int, default=16),
             A("--seed", type=seed_int, default=0), A("--out", default=None),
             A("--allow-extrapolation", action="store_true"))
    return smp


def _bench_and_train_commands(sub):
    ft = sub.add_parser("finetune", help="fine-tune an expert (KL-regularised RL)")
    ftsub = ft.add_subparsers(dest="finetune_domain", required=True)
    f = _command(ftsub, "toy2d", cmd_finetune_toy2d,
                 "on the exact testbed, against the analytic optimum")
    _add_finetune_args(f)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _command(bench, "toy2d", cmd_bench_toy2d, "time the exact-expert blend, 2 experts",
             A("--n", type=positive_int, default=20000),
             A("--steps", type=positive_int, default=1000),
             A("--no-reference", action="store_true", help="skip the numpy reference"))
    _command(bench, "finetune-toy2d", cmd_bench_finetune_toy2d,
             "estimators against the analytic optimum", A("--spec", default="bimodal-linear"),
             A("--out", default="bench-finetune-toy2d"), OVERWRITE,
             A("--dpok-seconds", type=positive_float, default=180.0),
             A("--quick", action="store_true", help="tiny sizes (a smoke test)"))
    _command(bench, "digits", cmd_bench_digits, "digits sampling throughput",
             A("--n", type=positive_int, default=200))
    _command(bench, "smc", cmd_bench_smc, "SMC-corrected blend: error against the target vs P",
             A("--spec", default="bimodal-linear"), A("--w", default="0.25,0.75"),
             A("--n", type=positive_int, default=65536),
             A("--particles", default="16,64,256,1024"),
             A("--steps", type=positive_int, default=1000), A("--seed", type=seed_int, default=0),
             A("--out", default="bench-smc"), OVERWRITE)
    _command(bench, "sd-memory", cmd_bench_sd_memory,
             "K LoRA experts in one forward vs K full models: peak memory and time",
             A("--config", default="small", choices=("small", "sd15"),
               help="a UNet shape (random weights)"),
             A("--experts", type=positive_int, default=3),
             A("--batch", type=positive_int, default=2), A("--rank", type=positive_int, default=4),
             A("--repeats", type=positive_int, default=3))
    return ftsub


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dblend", description="Diffusion Blend: inference-time "
               "multi-preference alignment of diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action=VersionAction, nargs=0,
                   help="print the versions of dblend and its main dependencies")
    sub = p.add_subparsers(dest="command", required=True)
    _toy2d_commands(sub)
    smp = _digits_commands(sub)
    ftsub = _bench_and_train_commands(sub)
    _sd_commands(sub, smp, ftsub)
    _sweep_commands(sub)
    _command(sub, "ui", cmd_ui, "live sliders for w and lambda (local web page)",
             A("--experts", default=None, help="digits expert names or sd LoRA dirs"),
             A("--sd-model", default=None, help="a local diffusers pipeline instead of digits"),
             A("--steps", type=positive_int, default=30, help="sd sampling steps"),
             A("--host", default="127.0.0.1"), A("--port", type=port_int, default=7860),
             A("--out", default="dblend-ui", help="where 'save image' writes"),
             A("--allow-extrapolation", action="store_true"), json=False)
    _command(sub, "demo", cmd_demo, "the main demo: digits DB-MPA / DB-KLA grids and report",
             A("--out", default="dblend-demo"), OVERWRITE, json=False)
    return p


def versions() -> str:
    """``dblend --version``: the project's version and its main dependencies'."""
    from importlib.metadata import PackageNotFoundError, version

    from diffusion_blend import __version__

    parts = [f"dblend {__version__}"]
    for pkg in ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors",
                "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from diffusion_blend.errors import DivergedError
    from diffusion_blend.offline import hub_offline

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:    # --help, --version (0) or a bad flag (2): already written
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with hub_offline():
            args.func(args)
    except UsageError as e:
        sys.stderr.write(f"dblend: error: {_one_line(e)}\n")
        return 2
    except DivergedError as e:
        sys.stderr.write(f"dblend: error: {_one_line(e)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
