"""``dblend distill digits|fashion``: the amortised blend of an image domain's shipped pair of
experts, distilled into one preference-conditioned adapter (see ``amortised``), saved beside
the experts."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_blend.adapters import AdapterView, adapter_state, add_lora
from diffusion_blend.amortised import (
    PrefEmbedding,
    coefficients,
    per_row_blend,
    sample_preferences,
)
from diffusion_blend.domains.images import (
    AMORTISED_ADAPTER,
    LORA_TARGETS,
    ImageSpec,
    amortised_name,
    attach_expert,
    classes_for,
    load_base,
)
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.objective import iteration_seeds
from diffusion_blend.finetune.run import check_resume, load_checkpoint, save_checkpoint
from diffusion_blend.io import prepare_out_dir, save_weights
from diffusion_blend.lr import warmup_lr
from diffusion_blend.sampling import sample

ADAPTER = AMORTISED_ADAPTER


@dataclass
class DistillConfig:
    """The distillation recipe (saved in the adapter's JSON)."""

    iterations: int = 600
    batch_size: int = 32          # blended trajectories per iteration (10 states each)
    lr: float = 3e-3
    lr_schedule: str = "cosine"   # a half cosine to zero at the last iteration (or "constant")
    lam_max: float = 2.0          # lam drawn uniformly on [0, lam_max]
    lora_rank: int = 8
    hidden: int = 64
    steps: int | None = None      # the chain distilled on (None: the domain's sampling steps)
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "lora_rank", "hidden", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name}={getattr(self, name)} is not allowed; use >= 1")
        if self.steps is not None and int(self.steps) < 1:
            raise UsageError(f"steps={self.steps} is not allowed; use >= 1 (or None: the "
                             "domain's)")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.lam_max)
                and self.lam_max > 0):
            raise UsageError(f"lr={self.lr}, lam_max={self.lam_max}: both must be finite, > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"lr_schedule {self.lr_schedule!r} is not known; use constant or "
                             "cosine")


class _RowBlend:
    """The per-row blend as a denoiser that keeps what it predicted (the regression targets)."""

    def __init__(self, base, experts, feats):
        self.base, self.experts, self.feats, self.outputs = base, experts, feats, []

    def __call__(self, x, t, **cond):
        out = per_row_blend(self.base, self.experts, x, t, cond, self.feats)
        self.outputs.append(out)
        return out


def _setup(spec: ImageSpec, weights_dir: Path, cfg: DistillConfig):
    model, base_meta = load_base(spec, weights_dir)
    experts = [attach_expert(spec, model, base_meta,
                             weights_dir / "experts" / f"{n}.safetensors")[0] for n in spec.pair]
    add_lora(model, ADAPTER, cfg.lora_rank, LORA_TARGETS, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    emb = PrefEmbedding(len(spec.pair), model.unet.time_embedding.linear_2.out_features, cfg.hidden)
    emb.attach(model.unet.time_embedding)
    return model, base_meta, experts, emb


def _iteration(spec: ImageSpec, model, experts, emb, opt, cfg: DistillConfig,
               it: int) -> float:
    seeds = iteration_seeds(cfg.seed, it, cfg.batch_size)
    y = classes_for(seeds, len(spec.classes))
    gen = torch.Generator().manual_seed((cfg.seed << 32) + it)
    feats = coefficients(*sample_preferences(gen, len(seeds), len(spec.pair), cfg.lam_max))
    teacher = _RowBlend(AdapterView(model, None), experts, feats)
    schedule = spec.schedule()
    res = sample(teacher, schedule, seeds, spec.shape, cfg.steps, cond={"y": y}, record=True)
    steps = schedule.transitions(cfg.steps)
    x = torch.cat(res.states[:-1])
    t = torch.cat([torch.full((len(seeds),), v) for v, _, _ in steps])
    emb.current = feats.repeat(len(steps), 1)
    try:
        pred = AdapterView(model, ADAPTER)(x, t, y=y.repeat(len(steps)))
    finally:
        emb.current = None
    loss = (pred - torch.cat(teacher.outputs)).pow(2).mean()
    for group in opt.param_groups:
        group["lr"] = warmup_lr(cfg.lr, it, 0, cfg.iterations, cfg.lr_schedule == "cosine")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_distill(spec: ImageSpec, weights_dir: Path, out: Path, cfg: DistillConfig | None = None,
                resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train (or resume) and save ``OUT/amortised_<pair>.safetensors`` with its JSON."""
    cfg = cfg or DistillConfig()
    cfg = replace(cfg, steps=cfg.steps or spec.steps)      # resolved before it is saved
    weights_dir, out = Path(weights_dir), Path(out)
    if resume:
        check_resume(out, asdict(cfg))
    model, base_meta, experts, emb = _setup(spec, weights_dir, cfg)
    params = [p for p in model.parameters() if p.requires_grad] + list(emb.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    modules, opts = {"lora": model, "pref": emb}, {"optimizer": opt}
    if not resume:
        prepare_out_dir(out, overwrite, "distill")
    start = load_checkpoint(out, modules, opts)["iteration"] if resume else 0
    t0, loss = time.perf_counter(), float("nan")
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations,
               disable=not progress, desc="distill")
    for it in bar:
        loss = _iteration(spec, model, experts, emb, opt, cfg, it)
        bar.set_postfix(loss=f"{loss:.4f}")
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            save_checkpoint(out, it + 1, modules, opts, asdict(cfg))
    state = {f"lora.{k}": v for k, v in adapter_state(model, ADAPTER).items()}
    state |= {f"pref.{k}": v.detach().contiguous() for k, v in emb.state_dict().items()}
    return save_weights(out / f"{amortised_name(spec)}.safetensors", state, {
        "recipe": spec.recipe("amortised"), "pair": list(spec.pair), "config": asdict(cfg),
        "base_sha256": base_meta["sha256"], "final_loss": loss,
        "lora": {"rank": cfg.lora_rank, "targets": list(LORA_TARGETS)},
        "train_seconds": time.perf_counter() - t0})
