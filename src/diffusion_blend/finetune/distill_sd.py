"""``dblend distill sd``: the blend of K LoRA experts on any diffusers pipeline (UNet or
transformer; eps, v or flow prediction) distilled into one preference-conditioned LoRA.

Each iteration draws one preference per process, ``w`` on the simplex (a share at its vertices)
and ``lam`` on ``[0, lam_max]``, runs the pipeline's own ``__call__`` with the blend installed
(``blend_pipeline``) on a batch of prompts from the file, records every denoiser call (its
inputs, classifier-free-guidance batch included, and the blended prediction), then regresses
the student (the denoiser with the ``amortised`` adapter active and ``(lam w, lam)`` added to
its time embedding) onto those predictions. The adapter and embedding are saved to
``OUT/amortised.safetensors`` for ``dblend sample sd --amortised OUT`` and ``amortise_pipeline``.
Resumable; under ``accelerate launch`` each process runs its share of the prompts and the
gradients are averaged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_blend.adapters import add_lora, base_sha256, use_adapter
from diffusion_blend.amortised import (
    AMORTISED_ADAPTER,
    AMORTISED_FILE,
    PrefEmbedding,
    amortised_state,
    coefficients,
    sample_preferences,
    time_embedding_of,
)
from diffusion_blend.blend import Preference
from diffusion_blend.distributed import Dist
from diffusion_blend.domains import sd
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.objective import iteration_seeds
from diffusion_blend.finetune.run import check_resume, load_checkpoint, save_checkpoint
from diffusion_blend.io import prepare_out_dir, save_weights
from diffusion_blend.lr import warmup_lr
from diffusion_blend.pipelines import blend_pipeline, denoiser_attr, prediction_of, unblend_pipeline


@dataclass
class SdDistillConfig:
    """The distillation recipe (saved with the adapter)."""

    iterations: int = 300
    batch_size: int = 2            # prompts per iteration (one blended pipeline call)
    steps: int = 20                # the pipeline's num_inference_steps
    guidance: float = 7.5
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    lam_max: float = 2.0
    lora_rank: int = 8
    hidden: int = 64
    seed: int = 0
    checkpoint_every: int = 25
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "steps", "lora_rank", "hidden",
                     "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name}={getattr(self, name)} is not allowed; use >= 1")
        for name in ("lr", "lam_max", "guidance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"{name}={v} is not allowed; use a finite value > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"lr_schedule {self.lr_schedule!r} is not known; use constant or "
                             "cosine")
        if not 0 <= self.seed < 2**24:
            raise UsageError(f"--seed {self.seed} is not allowed; a run's seed is 0 ... 2**24 - 1")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise UsageError(f"--{name} {v} is not allowed; use a multiple of 8")


class Recorder:
    """Installed as the denoiser's forward around the blend: keeps each call's inputs and the
    blended prediction (the regression targets)."""

    def __init__(self, blended):
        self.blended, self.calls = blended, []

    def __call__(self, *args, **kwargs):
        out = self.blended(*args, **kwargs)
        self.calls.append((_detach(args), _detach(kwargs), prediction_of(out).detach()))
        return out


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_detach(x) for x in v)
    return v


def student_backward(model, emb: PrefEmbedding, feats: torch.Tensor, calls: list) -> float:
    """Mean squared error of the student's predictions against the recorded blend's, its
    gradient accumulated call by call (one call's activations held at a time)."""
    total = 0.0
    emb.current = feats
    try:
        with use_adapter(model, AMORTISED_ADAPTER):
            for args, kwargs, target in calls:
                pred = prediction_of(type(model).forward(model, *args, **kwargs))
                loss = (pred.float() - target.float()).pow(2).mean() / len(calls)
                loss.backward()
                total += float(loss.detach())
    finally:
        emb.current = None
    return total


def teacher_calls(pipe, blended, prompts: list[str], seeds: list[int],
                  cfg: SdDistillConfig) -> list:
    """One blended pipeline call on ``prompts`` (per-sample generators); its denoiser calls."""
    model = getattr(pipe, denoiser_attr(pipe))
    recorder = Recorder(blended)
    object.__setattr__(model, "forward", recorder)
    try:
        with torch.no_grad():
            pipe(prompt=prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                 height=cfg.height, width=cfg.width, output_type="latent",
                 generator=[torch.Generator(pipe.device).manual_seed(s) for s in seeds])
    finally:
        object.__setattr__(model, "forward", blended)
    return recorder.calls


def setup(pipe, names: list[str], cfg: SdDistillConfig):
    """The student adapter and embedding on the pipeline's denoiser (whose adapters ``names``
    are the experts), and the teacher blend installed."""
    model = getattr(pipe, denoiser_attr(pipe))
    model.requires_grad_(False)
    base = base_sha256(model)
    add_lora(model, AMORTISED_ADAPTER, cfg.lora_rank, expert_targets(model, names),
             seed=cfg.seed)
    module, dim = time_embedding_of(model)
    torch.manual_seed(cfg.seed)
    emb = PrefEmbedding(len(names), dim, cfg.hidden).to(pipe.device)
    emb.attach(module)
    blended = blend_pipeline(pipe, names, Preference((1.0 / len(names),) * len(names)))
    return model, emb, blended, base


def expert_targets(model, names: list[str]) -> list[str]:
    """The modules the experts' LoRAs adapt (the student adapts the same ones)."""
    targets: set[str] = set()
    for name in names:
        t = model.peft_config[name].target_modules
        targets |= {t} if isinstance(t, str) else set(t)
    return sorted(targets)


def iteration(pipe, parts, opt, prompts: list[str], cfg: SdDistillConfig, it: int,
              dist: Dist) -> float:
    """One iteration: a preference, a blended call on this process's prompts, one step."""
    model, emb, blended, _ = parts
    gen = torch.Generator().manual_seed((cfg.seed << 32) + it)
    w, lam = sample_preferences(gen, 1, blended.k, cfg.lam_max)
    blended.preference = Preference(tuple(float(v) for v in w[0]), float(lam[0]), True)
    seeds = dist.shard(iteration_seeds(cfg.seed, it, cfg.batch_size))
    calls = teacher_calls(pipe, blended, [prompts[s % len(prompts)] for s in seeds], seeds,
                          cfg)
    opt.zero_grad()
    loss = student_backward(model, emb, coefficients(w, lam).to(pipe.device), calls)
    for group in opt.param_groups:
        group["lr"] = warmup_lr(cfg.lr, it, 0, cfg.iterations, cfg.lr_schedule == "cosine")
    params = [p for g in opt.param_groups for p in g["params"]]
    dist.sync_grads(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return dist.mean(loss)


def run_distill_sd(model: str | Path, experts: list[str], prompts_file: str | Path,
                   out: str | Path, cfg: SdDistillConfig | None = None, resume: bool = False,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """``dblend distill sd``: the pipeline and LoRA directories from disk, then ``distill``."""
    prompts = sd.read_prompts(prompts_file)
    pipe = sd.load_pipeline(model, device=Dist().device())
    names = sd.load_experts(pipe, experts)
    meta = {"model": str(model), "experts": [str(e) for e in experts]}
    return distill(pipe, names, prompts, out, cfg, resume, overwrite, progress, meta)


def distill(pipe, names: list[str], prompts: list[str], out: str | Path,
            cfg: SdDistillConfig | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool = True, meta: dict | None = None,
            stop_after: int | None = None) -> dict:
    """Train (or resume) the amortised blend of ``pipe``'s adapters ``names``; save
    ``OUT/amortised.safetensors`` with its JSON (``meta`` added). ``stop_after``: return after
    that iteration without saving (as a killed run would; tests resume from there)."""
    cfg, out, dist = cfg or SdDistillConfig(), Path(out), Dist()
    if resume:
        check_resume(out, asdict(cfg))
    parts = setup(pipe, names, cfg)
    params = [p for p in parts[0].parameters() if p.requires_grad] + list(parts[1].parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    modules, opts = {"lora": parts[0], "pref": parts[1]}, {"optimizer": opt}
    if not resume and dist.main:
        prepare_out_dir(out, overwrite, "distill-sd")
    dist.barrier()
    start = load_checkpoint(out, modules, opts)["iteration"] if resume else 0
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations,
               disable=not (progress and dist.main), desc="distill sd")
    for it in bar:
        losses.append(iteration(pipe, parts, opt, prompts, cfg, it, dist))
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        if dist.main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
            save_checkpoint(out, it + 1, modules, opts, asdict(cfg))
        if stop_after is not None and it + 1 >= stop_after:
            unblend_pipeline(pipe)
            return {"stopped_at": it + 1}
    unblend_pipeline(pipe)
    meta = {"recipe": "dblend distill sd", "experts": list(names), **(meta or {}),
            "prompts": prompts, "config": asdict(cfg), "base_sha256": parts[3],
            "final_loss": losses[-1] if losses else None, "train_seconds": time.perf_counter() - t0,
            "lora": {"rank": cfg.lora_rank, "targets": expert_targets(parts[0], names)}}
    if not dist.main:
        return meta
    return save_weights(out / AMORTISED_FILE, amortised_state(parts[0], parts[1]), meta)
