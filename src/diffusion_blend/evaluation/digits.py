"""Sampling and measuring on the digits domain: classifier agreement, a feature-space distance,
and the base recipe (``dblend train-base digits``)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffusion_blend.blend import Denoiser
from diffusion_blend.domains import digits
from diffusion_blend.domains.digits import DEFAULT_STEPS, sample_digits
from diffusion_blend.io import prepare_out_dir, save_weights, write_json


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (FID's formula)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    va, Ua = torch.linalg.eigh(ca)
    sa = Ua @ torch.diag(va.clamp(min=0).sqrt()) @ Ua.T
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * cross)


@torch.no_grad()
def quality(denoiser: Denoiser, judge: digits.Classifier, per_class: int = 50, seed: int = 0,
            steps: int = DEFAULT_STEPS, guidance: float = 1.0) -> dict:
    """Judge-classifier agreement per class on generated digits, and the Fréchet distance in
    the judge's feature space to the real test split (and, for scale, train vs test)."""
    classes = torch.arange(10).repeat_interleave(per_class)
    seeds = list(range(seed, seed + len(classes)))
    x0, _ = sample_digits(denoiser, classes, seeds, steps, guidance)
    pred = judge(x0).argmax(1)
    per = [float((pred[classes == c] == c).float().mean()) for c in range(10)]
    data = digits.load_data()
    return {
        "accuracy": float((pred == classes).float().mean()), "accuracy_per_class": per,
        "frechet": frechet_distance(judge.features(x0), judge.features(data["test_x"])),
        "frechet_train_vs_test": frechet_distance(judge.features(data["train_x"]),
                                                  judge.features(data["test_x"])),
        "samples": len(classes), "steps": steps, "guidance": guidance,
    }


def run_train_base(out: str | Path, cfg: digits.BaseConfig | None = None,
                   overwrite: bool = False, progress: bool = True,
                   classifier_epochs: int = 40, quality_per_class: int = 50) -> dict:
    """The base recipe: reward classifier, judge classifier, then the diffusion model."""
    cfg = cfg or digits.BaseConfig()
    out = prepare_out_dir(out, overwrite, "digits-base")
    start = time.perf_counter()
    split = {"source": "sklearn.datasets.load_digits", "split_seed": cfg.split_seed,
             "test_fraction": 0.2}
    metas = {}
    for name, ccfg in (
            ("classifier", digits.ClassifierConfig(seed=cfg.seed, epochs=classifier_epochs)),
            ("judge", digits.ClassifierConfig(seed=cfg.seed + 1, width=48,
                                              epochs=classifier_epochs))):
        model, stats = digits.train_classifier(ccfg)
        metas[name] = save_weights(out / f"{name}.safetensors", model.state_dict(), {
            "recipe": "dblend train-base digits", "config": vars(ccfg), "data": split, **stats})
    unet, stats = digits.train_base(cfg, progress)
    judge = digits.load_classifier("judge", out)
    q = quality(digits.UNetDenoiser(unet), judge, per_class=quality_per_class, seed=10_000)
    meta = save_weights(out / "base.safetensors", unet.state_dict(), {
        "recipe": "dblend train-base digits", "config": asdict(cfg),
        "unet": {k: list(v) if isinstance(v, tuple) else v
                 for k, v in digits.UNET_CONFIG.items()},
        "data": split, **stats, "quality": q})
    summary = {"out": str(out), "seconds": time.perf_counter() - start, "base": meta,
               "classifier": metas["classifier"], "judge": metas["judge"]}
    write_json(out / "train_base.json", summary)
    return summary
