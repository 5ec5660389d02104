"""An image domain's experts (``dblend finetune digits|fashion``): LoRA adapters on its base,
fine-tuned by the project's engine; MORL on a w grid of its pair; DB-KLA's lambda fine-tunes.

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
from diffusion_blend.domains.images import (
    LORA_TARGETS,
    ImageSpec,
    classes_for,
    kla_name,
    load_base,
    load_classifier,
    morl_name,
    normalised_rewards,
    reward_options,
    sample_images,
)
from diffusion_blend.finetune.config import FinetuneConfig, preset
from diffusion_blend.finetune.objective import Task, evaluate, iteration_seeds
from diffusion_blend.finetune.run import check_run_dir, run_identity, train
from diffusion_blend.io import save_weights, write_json
from diffusion_blend.rewards import WeightedSum, get_reward


def reward_stats(spec: ImageSpec, base: nn.Module, classifier: nn.Module, n: int = 500) -> dict:
    """Mean and std of each raw reward under the pretrained model (for normalisation)."""
    seeds = list(range(20_000, 20_000 + n))
    y = classes_for(seeds, len(spec.classes))
    x0, _ = sample_images(spec, base, y, seeds)
    out = {}
    for name in spec.rewards:
        r = get_reward(name, **reward_options(name, classifier))
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


def make_task(domain: ImageSpec, model: nn.Module, adapter: str, reward: Callable,
              cfg: FinetuneConfig) -> Task:
    add_lora(model, adapter, cfg.lora_rank, LORA_TARGETS, seed=cfg.seed)
    policy, ref = AdapterView(model, adapter), AdapterView(model, None)
    n = len(domain.classes)
    return Task(policy, ref, reward, domain.schedule(), domain.shape,
                cond=lambda seeds: {"y": classes_for(seeds, n)},
                freeze_last_step=cfg.freeze_last_step)


def run_meta(domain: ImageSpec, spec: ExpertSpec, cfg: FinetuneConfig, base_sha256: str) -> dict:
    """What identifies an adapter's run beside its config (a resume must match both)."""
    return {"domain": domain.name, "expert": spec.name, "rewards": spec.rewards, "w": spec.w,
            "alpha": cfg.alpha, "spacing": domain.spacing, "base_sha256": base_sha256}


def train_expert(domain: ImageSpec, weights_dir: Path, out: Path, spec: ExpertSpec,
                 cfg: FinetuneConfig, stats: dict, progress: bool = True,
                 resume: bool = False) -> dict:
    """Fine-tune one adapter on ``r_w`` (normalised rewards) and save it beside the base;
    ``resume`` continues its run under ``OUT/runs`` if one was begun (the same config)."""
    base, base_meta = load_base(domain, weights_dir)
    classifier = load_classifier(domain, "classifier", weights_dir)
    reward = WeightedSum(normalised_rewards(spec.rewards, stats, classifier), spec.w)
    model = base  # the adapter is injected into the (frozen) base network
    task = make_task(domain, model, spec.name, reward, cfg)
    meta = run_meta(domain, spec, cfg, base_meta["sha256"])
    start = time.perf_counter()
    run = out / "runs" / spec.name
    run.parent.mkdir(parents=True, exist_ok=True)
    again = resume and (run / "config.json").exists()
    train(task, cfg, run, meta, resume=again, overwrite=not again, progress=progress)
    seconds = time.perf_counter() - start
    ev = evaluate(task, iteration_seeds(cfg.seed, 0, cfg.eval_trajectories, 1 << 39),
                  cfg.sample_steps, cfg.alpha)
    return save_weights(out / f"{spec.name}.safetensors", adapter_state(model, spec.name), {
        "recipe": domain.recipe("expert"), **meta, "config": cfg.to_dict(),
        "reward_stats": {n: stats[n] for n in spec.rewards}, "train_seconds": seconds,
        "lora": {"rank": cfg.lora_rank, "targets": list(LORA_TARGETS)}, "eval": ev})


def expert_specs(domain: ImageSpec, alpha: float,
                 also: Sequence[str] = ()) -> list[tuple[ExpertSpec, str, dict]]:
    """Every adapter of the recipe: one expert per fine-tuned reward, MORL on a w grid of the
    pair, and lambda-specific fine-tunes (alpha / lambda) of the pair's first reward; ``also``:
    experts for other rewards of the domain (by the pair's preset), trained only when named."""
    pair = domain.pair
    pathwise = domain.finetuned[pair[0]]
    out = [(ExpertSpec(r, [r], [1.0], alpha, p.split("-")[1]), p, {})
           for r, p in domain.finetuned.items()]
    out += [(ExpertSpec(r, [r], [1.0], alpha, "pathwise"), pathwise, {}) for r in also]
    for w1 in domain.morl_grid:
        spec = ExpertSpec(morl_name(w1, pair), list(pair), [w1, 1 - w1], alpha, "pathwise")
        out.append((spec, pathwise, {}))
    for lam in domain.kla:
        out.append((ExpertSpec(kla_name(pair[0], lam), [pair[0]], [1.0], alpha / lam,
                               "pathwise"), pathwise, {"alpha": alpha / lam}))
    return out


def optional_experts(domain: ImageSpec, names: Sequence[str] | None) -> list[str]:
    """The rewards among ``names`` that the domain reports but does not fine-tune by default
    (``--only class-logprob``): they get an expert when asked for by name."""
    return [n for n in names or () if n in domain.rewards and n not in domain.finetuned]


def run_train_experts(domain: ImageSpec, weights_dir: Path, out: Path,
                      alpha: float | None = None, iterations: int | None = None,
                      progress: bool = True, only: list[str] | None = None,
                      stop: str | None = None, steps: int | None = None,
                      resume: bool = False) -> dict:
    """The experts recipe (``dblend finetune DOMAIN``); writes adapters + ``rewards.json``.
    ``steps``: the chain trained on (default the domain's sampling steps); ``resume``: each
    adapter's run continues where a stopped recipe left it."""
    alpha = domain.alpha if alpha is None else alpha
    base, base_meta = load_base(domain, weights_dir)   # missing weights: error, nothing written
    classifier = load_classifier(domain, "classifier", weights_dir)
    plan = [(spec, preset(name, alpha=extra.get("alpha", alpha), iterations=iterations,
                          stop=stop, sample_steps=steps or domain.steps))
            for spec, name, extra in expert_specs(domain, alpha, optional_experts(domain, only))
            if not only or spec.name in only]
    for spec, cfg in plan if resume else ():     # a begun run with another config: refused now
        run = out / "runs" / spec.name
        if (run / "config.json").exists():
            meta = run_meta(domain, spec, cfg, base_meta["sha256"])
            check_run_dir(run, run_identity(cfg, meta), True, False)
    out.mkdir(parents=True, exist_ok=True)
    stats = reward_stats(domain, base, classifier)
    write_json(out / "rewards.json", stats)
    return {spec.name: train_expert(domain, weights_dir, out, spec, cfg, stats, progress, resume)
            for spec, cfg in plan}
