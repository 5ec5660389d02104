"""``dblend bench NAME``: speed, memory and accuracy figures printed as ratios of one run."""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_blend.cli.args import (
    OVERWRITE,
    SEED,
    arg,
    command,
    emit,
    parse_floats,
    positive_float,
    positive_int,
    threads,
)
from diffusion_blend.errors import UsageError


def cmd_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.toy2d import bench_toy2d

    threads(a.threads)
    emit(bench_toy2d(n=a.n, steps=a.steps, numpy_reference=not a.no_reference), a.json)


def cmd_finetune_toy2d(a: argparse.Namespace) -> None:
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    if a.suite:
        from diffusion_blend.bench.finetune_suite import KIND, bench_suite

        if a.spec is not None:
            raise UsageError(f"--spec {a.spec} with --suite: the suite runs its own specs")
        if a.resume and a.overwrite:
            raise UsageError("--resume with --overwrite: choose one")
        out = a.out or "bench-finetune-suite"
        if not a.resume:
            check_out_dir(out, a.overwrite, KIND)
        emit(bench_suite(out, a.overwrite, a.resume, quick=a.quick), a.json)
        return
    from diffusion_blend.bench.finetune_toy2d import bench_finetune_toy2d

    if a.resume:
        raise UsageError("--resume continues a --suite run; the single-spec bench reruns")
    spec, out = a.spec or "bimodal-linear", a.out or "bench-finetune-toy2d"
    load_problem(spec)
    check_out_dir(out, a.overwrite, "bench-finetune-toy2d")
    emit(bench_finetune_toy2d(spec, out, a.overwrite, dpok_budget_s=a.dpok_seconds,
                              quick=a.quick), a.json)


def cmd_experts(a: argparse.Namespace) -> None:
    from pathlib import Path

    from diffusion_blend.bench.experts import bench_experts, shipped

    threads(a.threads)
    if a.weights is not None and not shipped(Path(a.weights)):
        raise UsageError(f"--weights {a.weights}: no fine-tuned adapters in "
                         f"{Path(a.weights) / 'experts'} (run dblend finetune {a.domain} --out "
                         "there)")
    emit(bench_experts(a.n, a.runs, a.particles, a.seed, a.weights, a.steps, a.domain,
                       progress=not a.json), a.json)


def cmd_amortised(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.amortised import bench_amortised

    threads(a.threads)
    lams = parse_floats(a.lams, "--lams")
    if any(not 0 < lam <= 2 for lam in lams):
        raise UsageError(f"--lams {a.lams}: each lambda must be in (0, 2], the distilled "
                         "adapter's training range")
    emit(bench_amortised(a.n, lams, a.seed, a.weights, a.domain, progress=not a.json), a.json)


def cmd_digits(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.digits import bench_digits

    threads(a.threads)
    emit(bench_digits(a.n), a.json)


def cmd_sd_memory(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.sd_memory import bench_sd_memory

    emit(bench_sd_memory(a.config, a.experts, a.batch, a.rank, a.repeats), a.json)


def cmd_smc(a: argparse.Namespace) -> None:
    from diffusion_blend.bench.smc import bench_smc
    from diffusion_blend.blend import Preference
    from diffusion_blend.domains.toy2d import load_problem
    from diffusion_blend.io import check_out_dir

    threads(a.threads)
    ps = parse_floats(a.particles, "--particles")
    if any(p < 1 or p != int(p) or a.n % int(p) for p in ps):
        raise UsageError(f"--particles {a.particles}: whole numbers >= 1 that divide --n {a.n}")
    w = parse_floats(a.w, "--w")
    Preference.for_experts(w, load_problem(a.spec).k)
    if a.out:
        check_out_dir(a.out, a.overwrite, "bench-smc")
    emit(bench_smc(a.spec, w, a.n, tuple(int(p) for p in ps), a.steps, a.seed, a.out,
                   a.overwrite), a.json)


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks", description="benchmarks").add_subparsers(
        dest="bench", required=True, metavar="NAME")
    command(bench, "toy2d", cmd_toy2d, "time the exact-expert blend, 2 experts",
            arg("--n", type=positive_int, default=20000),
            arg("--steps", type=positive_int, default=1000),
            arg("--no-reference", action="store_true", help="skip the numpy reference"))
    command(bench, "finetune-toy2d", cmd_finetune_toy2d, "estimators against the optimum",
            arg("--spec", default=None, help="one spec (default bimodal-linear)"),
            arg("--suite", action="store_true", help="both estimators on the suite of specs "
                "the presets were not tuned on"),
            arg("--resume", action="store_true", help="--suite: continue a stopped run"),
            arg("--out", default=None, help="default bench-finetune-toy2d (bench-finetune-suite "
                "with --suite)"),
            OVERWRITE, arg("--dpok-seconds", type=positive_float, default=180.0),
            arg("--quick", action="store_true", help="tiny sizes (a smoke test)"))
    command(bench, "experts", cmd_experts, "each shipped fine-tune's gain ratio against the "
            "SMC-estimated optimum E_c[alpha log Z_c] (per prompted class)",
            arg("--domain", default="fashion", choices=("fashion", "digits")),
            arg("--weights", default=None, help="a weights directory with experts/ (default: "
                "the shipped weights)"),
            arg("--n", type=positive_int, default=512, help="trajectories per objective"),
            arg("--runs", type=positive_int, default=16,
                help="SMC runs per class (log Z's spread)"),
            arg("--particles", type=positive_int, default=16),
            arg("--steps", type=positive_int, default=None, help="sampling steps (default: "
                "each adapter's own, the chain it was trained on)"), SEED)
    command(bench, "amortised", cmd_amortised, "the distilled blend against DB-MPA over the w "
            "grid at each lambda (paired seeds), and its time per image over the single model's",
            arg("--domain", default="digits", choices=("digits", "fashion"),
                help="default digits (the domain that ships a distilled blend)"),
            arg("--weights", default=None, help="a weights directory with experts/ (default: "
                "the shipped weights)"),
            arg("--n", type=positive_int, default=500, help="paired seeds per point"),
            arg("--lams", default="0.5,1,1.5"), SEED)
    command(bench, "digits", cmd_digits, "digits sampling throughput",
            arg("--n", type=positive_int, default=200))
    command(bench, "smc", cmd_smc, "SMC-corrected blend: error against the target vs P",
            arg("--spec", default="bimodal-linear"), arg("--w", default="0.25,0.75"),
            arg("--n", type=positive_int, default=65536),
            arg("--particles", default="16,64,256,1024"),
            arg("--steps", type=positive_int, default=1000), SEED,
            arg("--out", default="bench-smc"), OVERWRITE)
    command(bench, "sd-memory", cmd_sd_memory,
            "K LoRA experts in one forward vs K full models: peak memory and time",
            arg("--config", default="small", choices=("small", "sd15"),
              help="a UNet shape (random weights)"),
            arg("--experts", type=positive_int, default=3),
            arg("--batch", type=positive_int, default=2),
            arg("--rank", type=positive_int, default=4),
            arg("--repeats", type=positive_int, default=3))
