"""Measuring an image domain's base, and its recipe (``dblend train-base DOMAIN``): judge
agreement with the prompted class and a Fréchet distance in the judge's feature space."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffusion_blend.blend import Denoiser
from diffusion_blend.domains.images import (
    BaseConfig,
    Classifier,
    ClassifierConfig,
    ImageSpec,
    UNetDenoiser,
    load_classifier,
    sample_images,
)
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.base import distill_guidance, train_base, train_classifier
from diffusion_blend.finetune.run import check_resume
from diffusion_blend.io import (
    prepare_out_dir,
    read_json,
    read_marker,
    save_weights,
    write_json,
)


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
def quality(spec: ImageSpec, denoiser: Denoiser, judge: Classifier, per_class: int = 50,
            seed: int = 0, steps: int | None = None, guidance: float = 1.0) -> dict:
    """Judge-classifier agreement per class on generated images, and the Fréchet distance in
    the judge's feature space to the real test split; for scale, the same distance from as many
    real train images as samples (the estimator's small-sample bias included: the floor)."""
    k = len(spec.classes)
    classes = torch.arange(k).repeat_interleave(per_class)
    x0, _ = sample_images(spec, denoiser, classes, list(range(seed, seed + len(classes))),
                          steps, guidance)
    pred = judge(x0).argmax(1)
    data = spec.load_data()
    feats = {k: torch.cat([judge.features(b) for b in data[k][:n].split(1024)])
             for k, n in (("train_x", len(x0)), ("test_x", len(data["test_x"])))}
    return {
        "accuracy": float((pred == classes).float().mean()),
        "accuracy_per_class": [float((pred[classes == c] == c).float().mean()) for c in range(k)],
        "frechet": frechet_distance(judge.features(x0), feats["test_x"]),
        "frechet_train_vs_test": frechet_distance(feats["train_x"], feats["test_x"]),
        "samples": len(classes), "steps": steps or spec.steps, "guidance": guidance,
    }


def _classifiers(spec: ImageSpec, out: Path, cfg: BaseConfig, reuse: bool) -> dict:
    """The reward classifier and the held-out judge (another seed and width); on resume, the
    files already written are kept."""
    metas = {}
    for name, seed, width in (("classifier", cfg.seed, 32), ("judge", cfg.seed + 1, 48)):
        if reuse and (out / f"{name}.safetensors").is_file():
            metas[name] = read_json(out / f"{name}.json", f"{name} metadata")
            continue
        ccfg = ClassifierConfig(**(spec.classifier_config | {"seed": seed, "width": width}))
        model, stats = train_classifier(spec, ccfg)
        metas[name] = save_weights(out / f"{name}.safetensors", model.state_dict(), {
            "recipe": spec.recipe(name), "config": vars(ccfg), "data": spec.data_source,
            **stats})
    return metas


def check_resumable(out: str | Path, kind: str) -> None:
    """``--resume`` needs a directory this recipe wrote."""
    marker = read_marker(out)
    if marker is None or marker.get("kind") != kind:
        raise UsageError(f"--resume: {out} is not a {kind} directory this tool wrote; "
                         "drop --resume to start one")


def run_train_base(spec: ImageSpec, out: str | Path, cfg: BaseConfig | None = None,
                   overwrite: bool = False, resume: bool = False, progress: bool = True,
                   quality_per_class: int = 50, stop_after: int | None = None) -> dict:
    """The base recipe: reward classifier, judge classifier, then the diffusion model
    (checkpointed; ``resume`` continues a stopped run in ``out``)."""
    cfg = cfg or BaseConfig(**spec.base_config)
    kind = f"{spec.name}-base"
    if resume:
        check_resumable(out, kind)
        for run in (Path(out), Path(out) / "guidance"):    # another config: refused up front
            if (run / "checkpoints" / "latest.json").is_file():
                check_resume(run, asdict(cfg))
    out = Path(out) if resume else prepare_out_dir(out, overwrite, kind)
    start = time.perf_counter()
    metas = _classifiers(spec, out, cfg, resume)
    resume_unet = resume and (out / "checkpoints" / "latest.json").is_file()
    unet, stats = train_base(spec, cfg, out, resume_unet, progress, stop_after)
    if stop_after is not None and stop_after < cfg.iterations:
        return {"out": str(out), "stopped_at": stop_after}
    if cfg.guidance_iterations:
        unet, more = distill_guidance(spec, cfg, unet, out, resume, progress)
        stats |= more
    judge = load_classifier(spec, "judge", out)
    q = quality(spec, UNetDenoiser(unet, spec.null_class), judge, quality_per_class, 10_000)
    meta = save_weights(out / "base.safetensors", unet.state_dict(), {
        "recipe": spec.recipe("base"), "config": asdict(cfg),
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.unet.items()},
        "data": spec.data_source, **stats, "quality": q})
    summary = {"out": str(out), "seconds": time.perf_counter() - start, "base": meta} | metas
    write_json(out / "train_base.json", summary)
    return summary
