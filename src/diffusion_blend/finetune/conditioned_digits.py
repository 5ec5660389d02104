"""``dblend finetune digits-conditioned``: the direct alternative to distilling the blend (the
ParetoSlider idea, with this project's estimators): the same preference-conditioned network as
the amortised blend (one LoRA plus the MLP of ``(lam w, lam)`` on the time embedding), trained
by KL-regularised fine-tuning with a preference drawn per trajectory.

Trajectory ``i`` gets ``(w_i, lam_i)`` from its own seed (``w`` on the simplex with a share at
its vertices, ``lam`` on ``[0, lam_max]``) and the objective ``lam_i w_i . r(x0) - alpha * path
KL``, whose optimum is ``p_pre exp(lam_i r_w / alpha)``: the target DB-KLA / DB-MPA approximate
at that preference. Saved in the amortised blend's format (``conditioned_<pair>``), so the same
loader serves it as the sweep method ``conditioned-rl``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffusion_blend.adapters import AdapterView, adapter_state, add_lora
from diffusion_blend.amortised import PrefEmbedding, coefficients, sample_preferences
from diffusion_blend.domains.digits import SPEC
from diffusion_blend.domains.images import (
    LORA_TARGETS,
    classes_for,
    conditioned_name,
    load_base,
    load_classifier,
    normalised_rewards,
)
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task
from diffusion_blend.finetune.run import train
from diffusion_blend.io import read_json, save_weights

ADAPTER = "conditioned"
LAM_MAX = 2.0


class PrefPolicy(nn.Module):
    """The preference-conditioned network as a policy: each row's features from ``pref``."""

    def __init__(self, network: nn.Module, embedding: PrefEmbedding):
        super().__init__()
        self.network, self.embedding = network, embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, pref=None, **cond) -> torch.Tensor:
        self.embedding.current = pref
        try:
            return self.network(x, t, **cond)
        finally:
            self.embedding.current = None


class DropPref(nn.Module):
    """The pretrained reference, which ignores the preference."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor, pref=None, **cond) -> torch.Tensor:
        return self.network(x, t, **cond)


def preferences_for(seeds: Sequence[int], k: int, lam_max: float = LAM_MAX) -> torch.Tensor:
    """Each trajectory's features ``(lam w, lam)`` from its own seed (any batch, resumable)."""
    rows = [coefficients(*sample_preferences(torch.Generator().manual_seed(int(s) ^ 0x5EED),
                                             1, k, lam_max)) for s in seeds]
    return torch.cat(rows)


def make_task(model: nn.Module, rewards: list, cfg: FinetuneConfig) -> tuple[Task, PrefEmbedding]:
    """The conditioned policy on the base, its reward ``sum_i (lam w_i) r_i`` per trajectory."""
    add_lora(model, ADAPTER, cfg.lora_rank, LORA_TARGETS, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    emb = PrefEmbedding(len(rewards), model.unet.time_embedding.linear_2.out_features, cfg.hidden)
    emb.attach(model.unet.time_embedding)
    k = len(rewards)

    def reward(x0: torch.Tensor, y=None, pref=None, **_) -> torch.Tensor:
        r = torch.stack([f(x0, y=y) for f in rewards], 1)
        return (r * pref[:, :k].to(r.dtype)).sum(1)

    def cond(seeds: Sequence[int]) -> dict:
        return {"y": classes_for(seeds), "pref": preferences_for(seeds, k)}

    task = Task(PrefPolicy(AdapterView(model, ADAPTER), emb), DropPref(AdapterView(model, None)),
                reward, SPEC.schedule(), SPEC.shape, cond=cond,
                freeze_last_step=cfg.freeze_last_step)
    return task, emb


def train_conditioned(weights_dir: Path, out: Path, cfg: FinetuneConfig,
                      progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune the conditioned adapter on the shipped pair's normalised rewards; save it
    beside the experts (``OUT/conditioned_<pair>.safetensors``)."""
    model, base_meta = load_base(SPEC, weights_dir)
    classifier = load_classifier(SPEC, "classifier", weights_dir)
    stats = read_json(Path(weights_dir) / "experts" / "rewards.json", "reward statistics")
    rewards = normalised_rewards(SPEC.pair, stats, classifier)
    task, emb = make_task(model, rewards, cfg)
    meta = {"domain": "digits", "pair": list(SPEC.pair), "alpha": cfg.alpha,
            "base_sha256": base_meta["sha256"]}
    start = time.perf_counter()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    train(task, cfg, out / "runs" / conditioned_name(SPEC), meta, resume=resume,
          overwrite=not resume, progress=progress)
    state = {f"lora.{k}": v for k, v in adapter_state(model, ADAPTER).items()}
    state |= {f"pref.{k}": v.detach().contiguous() for k, v in emb.state_dict().items()}
    return save_weights(out / f"{conditioned_name(SPEC)}.safetensors", state, meta | {
        "recipe": "dblend finetune digits-conditioned", "config": cfg.to_dict() | {
            "hidden": cfg.hidden, "lam_max": LAM_MAX}, "reward_stats": stats,
        "train_seconds": time.perf_counter() - start,
        "lora": {"rank": cfg.lora_rank, "targets": list(LORA_TARGETS)}})

