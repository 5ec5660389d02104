"""Digits experts: LoRA adapters on the shipped base, fine-tuned by the project's engine.

Rewards are normalised by the pretrained model's mean and standard deviation, so one alpha
moves every expert a similar distance. With a 10-step chain the last step's variance is tiny
and its KL would dominate, so the last step stays the pretrained map (``freeze_last_step``),
in training and in sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from diffusion_blend.adapters import (
    AdapterView,
    adapter_state,
    add_lora,
)
from diffusion_blend.domains import digits
from diffusion_blend.finetune.config import FinetuneConfig, preset
from diffusion_blend.finetune.objective import Task, evaluate, iteration_seeds
from diffusion_blend.finetune.run import train
from diffusion_blend.io import save_weights, write_json
from diffusion_blend.rewards import WeightedSum, get_reward
from diffusion_blend.rewards.digits import DIGIT_REWARDS


def reward_stats(base: nn.Module, names: Sequence[str], classifier: nn.Module,
                 n: int = 500) -> dict:
    """Mean and std of each raw reward under the pretrained model (for normalisation)."""
    seeds = list(range(20_000, 20_000 + n))
    y = digits.classes_for(seeds)
    x0, _ = digits.sample_digits(base, y, seeds)
    out = {}
    for name in names:
        r = get_reward(name, **digits.reward_options(name, classifier))
        v = r.raw(x0, y=y)
        out[name] = {"shift": float(v.mean()), "scale": float(v.std().clamp(min=1e-6))}
    return out


@dataclass
class ExpertSpec:
    """One adapter's description (what it was trained for)."""

    name: str
    rewards: list[str]
    w: list[float]
    alpha: float
    estimator: str


def make_task(model: nn.Module, adapter: str, reward: Callable,
              cfg: FinetuneConfig) -> Task:
    add_lora(model, adapter, cfg.lora_rank, digits.LORA_TARGETS, seed=cfg.seed)
    policy, ref = AdapterView(model, adapter), AdapterView(model, None)
    return Task(policy, ref, reward, digits.BaseConfig().schedule(), digits.SHAPE,
                cond=lambda seeds: {"y": digits.classes_for(seeds)},
                freeze_last_step=cfg.freeze_last_step)


def train_expert(weights_dir: Path, out: Path, spec: ExpertSpec, cfg: FinetuneConfig,
                 stats: dict, progress: bool = True) -> dict:
    """Fine-tune one adapter on ``r_w`` (normalised rewards) and save it beside the base."""
    base, base_meta = digits.load_base(weights_dir)
    classifier = digits.load_classifier("classifier", weights_dir)
    reward = WeightedSum(digits.normalised_rewards(spec.rewards, stats, classifier), spec.w)
    model = base  # the adapter is injected into the (frozen) base network
    task = make_task(model, spec.name, reward, cfg)
    meta = {"domain": "digits", "expert": spec.name, "rewards": spec.rewards, "w": spec.w,
            "alpha": cfg.alpha, "base_sha256": base_meta["sha256"]}
    start = time.perf_counter()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    train(task, cfg, out / "runs" / spec.name, meta, overwrite=True, progress=progress)
    seconds = time.perf_counter() - start
    ev = evaluate(task, iteration_seeds(cfg.seed, 0, cfg.eval_trajectories, 1 << 39),
                  cfg.sample_steps, cfg.alpha)
    return save_weights(out / f"{spec.name}.safetensors", adapter_state(model, spec.name), {
        "recipe": "dblend finetune digits", **meta, "config": cfg.to_dict(),
        "reward_stats": {n: stats[n] for n in spec.rewards}, "train_seconds": seconds,
        "lora": {"rank": cfg.lora_rank, "targets": list(digits.LORA_TARGETS)}, "eval": ev})


FINETUNED = {"ink": "digits-pathwise", "symmetry": "digits-pathwise", "crisp": "digits-dpok",
             "smooth": "digits-pathwise"}


def expert_specs(alpha: float, pair: Sequence[str] = digits.PAIR,
                 grid: Sequence[float] = digits.MORL_GRID,
                 kla: Sequence[float] = (0.5, 2.0)) -> list[tuple[ExpertSpec, str, dict]]:
    """Every adapter of the recipe: one expert per fine-tuned reward (``class`` is kept as the
    "still a digit" check: its margin did not improve under fine-tuning here), MORL on a w
    grid of ``pair``, and lambda-specific fine-tunes (alpha / lambda) of ``pair[0]``."""
    out = [(ExpertSpec(r, [r], [1.0], alpha, p.split("-")[1]), p, {}) for r, p in FINETUNED.items()]
    for w1 in grid:
        name = digits.morl_name(w1, pair)
        spec = ExpertSpec(name, list(pair), [w1, 1 - w1], alpha, "pathwise")
        out.append((spec, "digits-pathwise", {}))
    for lam in kla:
        name = f"kla_{pair[0]}_lam{lam:g}".replace(".", "p")
        out.append((ExpertSpec(name, [pair[0]], [1.0], alpha / lam, "pathwise"), "digits-pathwise",
                    {"alpha": alpha / lam}))
    return out


def run_train_experts(weights_dir: Path, out: Path, alpha: float = 0.5,
                      iterations: int | None = None, progress: bool = True,
                      only: list[str] | None = None, stop: str | None = None) -> dict:
    """The experts recipe (``dblend finetune digits``); writes adapters + ``rewards.json``."""
    base, _ = digits.load_base(weights_dir)          # missing weights: error, nothing written
    classifier = digits.load_classifier("classifier", weights_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = reward_stats(base, DIGIT_REWARDS, classifier)
    write_json(out / "rewards.json", stats)
    done = {}
    for spec, name, extra in expert_specs(alpha):
        if only and spec.name not in only:
            continue
        cfg = preset(name, alpha=extra.get("alpha", alpha), iterations=iterations, stop=stop)
        done[spec.name] = train_expert(weights_dir, out, spec, cfg, stats, progress)
    return done
