"""Training an image domain's pretrained networks (``dblend train-base DOMAIN``): the
class-conditional UNet by the DDPM loss with an EMA copy, resumable from checkpoints to the same
weights, and the small classifiers (reward classifier, held-out judge)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_blend.domains.images import (
    BaseConfig,
    Classifier,
    ClassifierConfig,
    ImageSpec,
    build_unet,
)
from diffusion_blend.finetune.run import load_checkpoint, save_checkpoint
from diffusion_blend.lr import warmup_lr


def _noised_batch(cfg: BaseConfig, abar: torch.Tensor, data: dict, g: torch.Generator,
                  null_class: int) -> tuple[torch.Tensor, ...]:
    """A random training batch noised to random steps: ``(x_t, t, y, eps, dropped)``, the class
    replaced by the null class with probability ``p_uncond`` (draws in one fixed order, so a
    restored generator continues the same stream)."""
    x_all, y_all = data["train_x"], data["train_y"]
    idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
    x0, y = x_all[idx], y_all[idx].clone()
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
    y[drop] = null_class
    t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y, eps, drop


def _ddpm_step(unet: nn.Module, opt, cfg: BaseConfig, abar: torch.Tensor, data: dict,
               g: torch.Generator, it: int, null_class: int) -> float:
    """One step of the noise-prediction loss on a random batch (class dropped with p_uncond)."""
    xt, t, y, eps, _ = _noised_batch(cfg, abar, data, g, null_class)
    loss = (unet(xt, t, class_labels=y).sample - eps).pow(2).mean()
    for group in opt.param_groups:
        group["lr"] = warmup_lr(cfg.lr, it, cfg.warmup, cfg.iterations)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _extra(ema: nn.Module, g: torch.Generator, losses: list[float], seconds: float) -> dict:
    """What a checkpoint keeps besides the trained weights and the optimizer (the seconds
    trained so far too, so a resumed run reports its whole training time)."""
    out = {f"ema.{k}": v.detach().clone() for k, v in ema.state_dict().items()}
    return out | {"generator": g.get_state(), "losses": torch.tensor(losses[-100:]),
                  "seconds": torch.tensor([seconds], dtype=torch.float64)}


def _restore_extra(extra: dict, ema: nn.Module, g: torch.Generator) -> tuple[list[float], float]:
    ema.load_state_dict({k[4:]: v for k, v in extra.items() if k.startswith("ema.")})
    g.set_state(extra["generator"])
    return extra["losses"].tolist(), float(extra["seconds"]) if "seconds" in extra else 0.0


def train_base(spec: ImageSpec, cfg: BaseConfig, out: Path | None = None,
               resume: bool = False, progress: bool = True,
               stop_after: int | None = None) -> tuple[nn.Module, dict]:
    """Train the class-conditional UNet (DDPM loss); returns the EMA model and stats. With
    ``out``, checkpoints go to ``out/checkpoints`` every ``cfg.checkpoint_every`` steps and
    ``resume`` continues from the last one to the same weights (``stop_after``: stop there,
    as a kill would)."""
    data = spec.load_data()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    unet, ema = build_unet(spec), build_unet(spec)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar, losses, start, before = cfg.schedule().abar.float(), [], 0, 0.0
    if resume:
        state = load_checkpoint(out, {"unet": unet}, {"optimizer": opt})
        start = state["iteration"]
        losses, before = _restore_extra(state["extra"], ema, g)
    t0 = time.perf_counter() - before
    for it in tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations,
                   disable=not progress, desc=f"train-base {spec.name}"):
        losses.append(_ddpm_step(unet, opt, cfg, abar, data, g, it, spec.null_class))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - cfg.ema)
        if out is not None and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
            save_checkpoint(out, it + 1, {"unet": unet}, {"optimizer": opt}, asdict(cfg),
                            _extra(ema, g, losses, time.perf_counter() - t0))
        if stop_after is not None and it + 1 >= stop_after:
            break
    stats = {"train_seconds": time.perf_counter() - t0, "resumed_at": start,
             "final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1)}
    return ema.eval(), stats


def _guided_step(student: nn.Module, teacher: nn.Module, opt, cfg: BaseConfig,
                 abar: torch.Tensor, data: dict, g: torch.Generator, it: int,
                 null_class: int) -> float:
    """One regression of the student onto the teacher's guided prediction (rows whose class
    is dropped keep the teacher's unconditional one, so guidance stays possible)."""
    xt, t, y, _, drop = _noised_batch(cfg, abar, data, g, null_class)
    with torch.no_grad():
        eu = teacher(xt, t, class_labels=torch.full_like(y, null_class)).sample
        target = eu + cfg.guidance * (teacher(xt, t, class_labels=y).sample - eu)
        target[drop] = eu[drop]
    loss = (student(xt, t, class_labels=y).sample - target).pow(2).mean()
    for group in opt.param_groups:
        group["lr"] = warmup_lr(cfg.guidance_lr, it, 0, cfg.guidance_iterations)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def distill_guidance(spec: ImageSpec, cfg: BaseConfig, teacher: nn.Module, out: Path | None,
                     resume: bool = False, progress: bool = True) -> tuple[nn.Module, dict]:
    """Classifier-free guidance at ``cfg.guidance`` folded into a copy of ``teacher`` (one
    network call per step instead of two); checkpointed in ``out/guidance``, resumable."""
    data, teacher = spec.load_data(), teacher.eval().requires_grad_(False)
    student = build_unet(spec)
    student.load_state_dict(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.guidance_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    abar, losses, start, t0 = cfg.schedule().abar.float(), [], 0, time.perf_counter()
    where = out / "guidance" if out is not None else None
    if resume and where is not None and (where / "checkpoints" / "latest.json").is_file():
        state = load_checkpoint(where, {"unet": student}, {"optimizer": opt})
        start = state["iteration"]
        g.set_state(state["extra"]["generator"])
        t0 -= float(state["extra"].get("seconds", 0.0))
    for it in tqdm(range(start, cfg.guidance_iterations), initial=start,
                   total=cfg.guidance_iterations, disable=not progress, desc="guidance"):
        losses.append(_guided_step(student, teacher, opt, cfg, abar, data, g, it,
                                   spec.null_class))
        if where is not None and ((it + 1) % cfg.checkpoint_every == 0
                                  or it + 1 == cfg.guidance_iterations):
            where.mkdir(exist_ok=True)
            seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            save_checkpoint(where, it + 1, {"unet": student}, {"optimizer": opt}, asdict(cfg),
                            {"generator": g.get_state(), "seconds": seconds})
    return student.eval(), {"guidance_seconds": time.perf_counter() - t0,
                            "guidance_final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1)}


def train_classifier(spec: ImageSpec, cfg: ClassifierConfig,
                     progress: bool = False) -> tuple[Classifier, dict]:
    """Train on the train split (input noise as augmentation); report test accuracy."""
    data = spec.load_data()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg.width, spec.size, len(spec.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x, y = data["train_x"], data["train_y"]
    for _ in tqdm(range(cfg.epochs), disable=not progress, desc="classifier"):
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            xb = x[idx] + cfg.noise * torch.randn(x[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in data["test_x"].split(1024)])
    return model, {"test_accuracy": float((pred == data["test_y"]).float().mean())}
