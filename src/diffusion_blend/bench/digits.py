"""``dblend bench digits``: sampling throughput on the shipped digits model and experts.

Images per second for the base, DB-MPA with K = 2 and 3 experts, and DB-MPA-LS, all with the
same seeds and 10 DDPM steps, measured in one run; plus the recipes' recorded wall times.
"""

from __future__ import annotations

import json
import time

import torch

from diffusion_blend.blend import Preference, StochasticBlend
from diffusion_blend.domains import digits
from diffusion_blend.domains.digits import DEFAULT_STEPS, sample_digits
from diffusion_blend.evaluation.digits_demo import DigitsModels


def _throughput(den, classes, seeds, repeats: int = 2) -> tuple[float, float]:
    best, nfe = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        _, nfe = sample_digits(den, classes, seeds, DEFAULT_STEPS)
        best = min(best, time.perf_counter() - start)
    return len(seeds) / best, nfe


def _amortised():
    """The shipped amortised blend at w = (0.5, 0.5), lam = 1 (None if not shipped)."""
    from diffusion_blend.errors import UsageError
    from diffusion_blend.finetune.distill_digits import load_amortised

    try:
        return load_amortised(preference=Preference((0.5, 0.5)))
    except UsageError:
        return None


def bench_digits(n: int = 200) -> dict:
    bench = DigitsModels(["ink", "symmetry", "crisp"])
    classes = torch.arange(10).repeat(n // 10)
    seeds = list(range(len(classes)))
    T = digits.BaseConfig().schedule().T
    methods = {
        "base": bench.base,
        "db-mpa-k2": bench.blend(["ink", "symmetry"], Preference((0.5, 0.5))),
        "db-mpa-k3": bench.blend(["ink", "symmetry", "crisp"], Preference((0.3, 0.3, 0.4))),
        "db-mpa-ls-k2": StochasticBlend([bench.expert("ink"), bench.expert("symmetry")],
                                        (0.5, 0.5), seeds, T),
        "base-plain": digits.load_base()[0],   # the network with no LoRA wrappers at all
    }
    amortised = _amortised()
    if amortised is not None:
        methods["amortised-k2"] = amortised
    out = {"n": len(seeds), "steps": DEFAULT_STEPS, "images_per_second": {}, "nfe_per_sample": {}}
    for name, den in methods.items():
        out["images_per_second"][name], out["nfe_per_sample"][name] = _throughput(den, classes,
                                                                                   seeds)
    base_ips = out["images_per_second"]["base"]
    out["time_ratio_vs_base"] = {k: base_ips / v for k, v in out["images_per_second"].items()}
    if amortised is not None:   # the target: at most 1.1x the single model
        ips = out["images_per_second"]
        out["amortised_time_vs_single_model"] = ips["base-plain"] / ips["amortised-k2"]
    meta = json.loads((digits.WEIGHTS_DIR / "base.json").read_text())
    out["recipe_seconds"] = {"train-base (diffusion model)": meta.get("train_seconds")}
    for name in ("ink", "symmetry", "crisp"):
        m = json.loads((digits.WEIGHTS_DIR / "experts" / f"{name}.json").read_text())
        out["recipe_seconds"][f"train-experts ({name})"] = m.get("train_seconds")
    return out
