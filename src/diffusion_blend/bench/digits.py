"""``dblend bench digits``: sampling throughput on the shipped digits model and experts.

Images per second for the base, DB-MPA with K = 2 and 3 experts, DB-MPA-LS and the amortised
blend (each sampled through the one dispatcher, ``run_method``), and the bare network, all with
the same seeds on the domain's chain (its DDPM steps), measured in one run; plus the recipes'
recorded wall times.
"""

from __future__ import annotations

import json
import time

import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains.digits import PAIR, SPEC, DigitsDomain
from diffusion_blend.domains.images import ImageSpec, load_base, sample_images
from diffusion_blend.evaluation.methods import run_method


def best_of(run, repeats: int = 2) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of ``run() -> (seconds, nfe per sample)``."""
    runs = [run() for _ in range(repeats)]
    return min(s for s, _ in runs), runs[-1][1]


def plain_time(spec: ImageSpec, classes: torch.Tensor, seeds: list[int],
               weights_dir=None) -> tuple[float, float]:
    """The network with no LoRA wrappers at all: the floor every method is compared with."""
    net = load_base(spec, weights_dir)[0]
    start = time.perf_counter()
    _, nfe = sample_images(spec, net, classes, seeds)
    return time.perf_counter() - start, nfe


def bench_digits(n: int = 200) -> dict:
    k3, pair = DigitsDomain(["ink", "symmetry", "crisp"]), DigitsDomain(PAIR)
    seeds = list(range(n // 10 * 10))
    jobs = {"base": (k3, "pretrained", (1.0, 0.0, 0.0)),
            "db-mpa-k2": (k3, "db-mpa", (0.5, 0.5, 0.0)),
            "db-mpa-k3": (k3, "db-mpa", (0.3, 0.3, 0.4)),
            "db-mpa-ls-k2": (k3, "db-mpa-ls", (0.5, 0.5, 0.0)),
            "amortised-k2": (pair, "amortised", (0.5, 0.5))}
    if pair.amortised(Preference((0.5, 0.5))) is None:
        del jobs["amortised-k2"]
    timings = {name: best_of(lambda d=d, m=m, w=w: cost_of(run_method(m, d, Preference(w), seeds)))
               for name, (d, m, w) in jobs.items()}
    timings["base-plain"] = best_of(lambda: plain_time(SPEC, k3.cond(seeds)["y"], seeds))
    out = {"n": len(seeds), "steps": SPEC.steps,
           "images_per_second": {k: len(seeds) / s for k, (s, _) in timings.items()},
           "nfe_per_sample": {k: nfe for k, (_, nfe) in timings.items()}}
    base_ips = out["images_per_second"]["base"]
    out["time_ratio_vs_base"] = {k: base_ips / v for k, v in out["images_per_second"].items()}
    if "amortised-k2" in jobs:   # the target: at most 1.1x the single model
        ips = out["images_per_second"]
        out["amortised_time_vs_single_model"] = ips["base-plain"] / ips["amortised-k2"]
    meta = json.loads((SPEC.weights_dir / "base.json").read_text())
    out["recipe_seconds"] = {"train-base (diffusion model)": meta.get("train_seconds")}
    for name in ("ink", "symmetry", "crisp"):
        m = json.loads((SPEC.weights_dir / "experts" / f"{name}.json").read_text())
        out["recipe_seconds"][f"train-experts ({name})"] = m.get("train_seconds")
    return out


def cost_of(res) -> tuple[float, float]:
    return res.seconds, res.nfe_per_sample
