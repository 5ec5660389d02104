"""``dblend bench experts --domain digits``: each shipped fine-tune against the best any model
can reach, ``alpha * log Z`` estimated by SMC (``evaluation.optimum``): its gain ratio with
standard errors, path KL and ``log Z``."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_blend.domains import digits
from diffusion_blend.domains.digits import DigitsDomain
from diffusion_blend.evaluation.optimum import gain_ratio
from diffusion_blend.io import read_json

SKIP = ("amortised_",)   # the distilled blend is not a fine-tune of one objective


def shipped(weights_dir: Path) -> list[str]:
    """The fine-tuned adapters shipped beside the experts (experts, MORL, DB-KLA)."""
    out = weights_dir / "experts"
    return sorted(p.stem for p in out.glob("*.safetensors") if not p.stem.startswith(SKIP))


def bench_experts(n: int = 512, runs: int = 64, particles: int = 16, seed: int = 0,
                  weights_dir: Path | None = None) -> dict:
    """Gain ratio of every shipped adapter on its own objective ``w . r`` at its alpha."""
    weights_dir = Path(weights_dir or digits.WEIGHTS_DIR)
    domains: dict[tuple, DigitsDomain] = {}
    rows = {}
    for name in shipped(weights_dir):
        meta = read_json(weights_dir / "experts" / f"{name}.json", "adapter metadata")
        key = tuple(meta["rewards"])
        domain = domains.setdefault(key, DigitsDomain(key, weights_dir=weights_dir))
        w = torch.tensor(meta["w"], dtype=torch.float64)

        def reward(x0, y=None, domain=domain, w=w, **_):
            return domain.rewards(x0, y=y).double() @ w

        res = gain_ratio(domain, domain.adapter(name), reward, float(meta["alpha"]), n, runs,
                         particles, seed)
        rows[name] = {"rewards": meta["rewards"], "w": meta["w"], "alpha": meta["alpha"]} | res
    return {"domain": "digits", "n": n, "smc_runs": runs, "particles": particles,
            "experts": rows}
