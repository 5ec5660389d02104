"""``dblend bench experts --domain fashion|digits``: each shipped fine-tune against the best any
model can reach, ``E_c[alpha * log Z_c]`` over the prompted classes, estimated by SMC
(``evaluation.optimum``): its gain ratio with standard errors, path KL and ``log Z``, and how
often the held-out judge classifier still reads the prompted class (a fine-tune that moves the
base far may stop drawing it)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_blend.domains import image_domain
from diffusion_blend.domains.images import ImageDomain, load_classifier
from diffusion_blend.evaluation.optimum import gain_ratio
from diffusion_blend.io import read_json
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range

SKIP = ("amortised_", "conditioned_")   # one network for every preference: no one objective


def shipped(weights_dir: Path) -> list[str]:
    """The fine-tuned adapters shipped beside the experts (experts, MORL, DB-KLA)."""
    out = weights_dir / "experts"
    return sorted(p.stem for p in out.glob("*.safetensors") if not p.stem.startswith(SKIP))


@torch.no_grad()
def judge_agreement(domain: ImageDomain, model, judge, seeds: list[int]) -> float:
    """The share of ``model``'s images the judge reads as the prompted class."""
    cond = domain.cond(seeds)
    x0 = sample(model, domain.schedule, seeds, domain.shape, domain.steps, cond=cond).x0
    return float((judge(x0).argmax(1) == cond["y"]).float().mean())


def bench_experts(n: int = 512, runs: int = 16, particles: int = 16, seed: int = 0,
                  weights_dir: Path | None = None, steps: int | None = None,
                  domain_name: str = "digits", progress: bool = False) -> dict:
    """Gain ratio of every shipped adapter on its own objective ``w . r`` at its alpha, on the
    chain it was trained on (its steps and spacing; ``steps`` overrides the steps)."""
    kind = image_domain(domain_name)
    weights_dir = Path(weights_dir or kind.spec.weights_dir)
    domains: dict[tuple, ImageDomain] = {}
    rows, judge = {}, load_classifier(kind.spec, "judge", weights_dir)
    for name in tqdm(shipped(weights_dir), disable=not progress, desc="adapters"):
        meta = read_json(weights_dir / "experts" / f"{name}.json", "adapter metadata")
        chain = (steps or meta["config"]["sample_steps"], meta.get("spacing", "linear"))
        key = tuple(meta["rewards"])
        if key + chain not in domains:
            domains[key + chain] = kind(key, chain[0], weights_dir=weights_dir, spacing=chain[1])
        domain = domains[key + chain]
        w = torch.tensor(meta["w"], dtype=torch.float64)

        def reward(x0, y=None, domain=domain, w=w, **_):
            return domain.rewards(x0, y=y).double() @ w

        model = domain.adapter(name)
        res = gain_ratio(domain, model, reward, float(meta["alpha"]), n, runs, particles, seed)
        rows[name] = {"rewards": meta["rewards"], "w": meta["w"], "alpha": meta["alpha"],
                      "steps": chain[0], "spacing": chain[1]} | res
        rows[name]["judge_agreement"] = judge_agreement(domain, model, judge, seed_range(seed, n))
    first = next(iter(domains.values()), None)   # every domain holds the same base
    base = judge_agreement(first, first.base, judge, seed_range(seed, n)) if first else None
    return {"domain": domain_name, "n": n, "smc_runs_per_class": runs, "particles": particles,
            "steps": first.steps if first else steps,   # the pretrained model's chain
            "pretrained_judge_agreement": base, "experts": rows}
