"""Fine-tuning on the exact testbed, where the best reachable objective is known in closed form.

An expert is the exact pretrained ``eps`` plus a small time-conditioned MLP correction whose
output layer starts at zero: at initialisation the model *is* the pretrained model, and only the
control is learned. The optimum of ``E[r_w] - alpha * KL`` is ``alpha * log E_pre[exp(r_w/alpha)]``
(Gibbs variational principle); progress is reported as the fraction of that gain reached.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffusion_blend.domains.toy2d import MixtureDenoiser, Toy2dProblem, TrainedExpert
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task, evaluate, iteration_seeds
from diffusion_blend.finetune.run import load_trainable, save_expert, train
from diffusion_blend.io import load_weights, write_json

EVAL_OFFSET = 1 << 39  # evaluation trajectories never reuse training seeds


class CorrectionMLP(nn.Module):
    """``eps_theta(x, t) = eps_pre(x, t) + MLP(x, t)`` with a zero-initialised last layer.

    The time embedding enters the first layer additively, so for a batch at one timestep it is
    computed once. ``pair`` returns ``(eps_theta, eps_pre)`` from one evaluation of the exact
    ``eps_pre``, which the estimators use for the per-step KL.
    """

    def __init__(self, pre: MixtureDenoiser, dim: int, T: int, hidden: int = 64):
        super().__init__()
        self.pre, self.T = pre, T
        self.register_buffer("freqs", 2.0 ** torch.arange(0, 6, dtype=torch.float32) * math.pi)
        self.x_in = nn.Linear(dim, hidden)
        self.t_in = nn.Linear(13, hidden, bias=False)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        s = (t.float() / self.T)[:, None]
        return torch.cat([s, torch.sin(s * self.freqs), torch.cos(s * self.freqs)], 1)

    def correction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)
        if len(t) > 1 and bool((t == t[0]).all()):
            t = t[:1]                                   # one embedding for the whole batch
        return self.net(self.x_in(x) + self.t_in(self.embed(t))).to(x.dtype)

    def pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps_pre = self.pre(x, t)
        return eps_pre + self.correction(x, t), eps_pre

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.pair(x, t)[0]


def base_hash(problem: Toy2dProblem) -> str:
    """Identity of the pretrained model: the base mixture and the noise schedule."""
    spec = {"mixture": problem.spec["mixture"], "schedule": problem.spec["schedule"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def make_task(problem: Toy2dProblem, cfg: FinetuneConfig) -> Task:
    """The policy (exact base + zero-initialised correction) and the reward ``r_w``."""
    w = _check_w(problem, cfg.w)
    pre = problem.base_denoiser()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        policy = CorrectionMLP(pre, problem.mixture.dim, problem.schedule.T, cfg.hidden)

    def reward(x: torch.Tensor, **_) -> torch.Tensor:
        return problem.rewards_of(x.double()).float() @ w

    return Task(policy, pre, reward, problem.schedule, (problem.mixture.dim,))


def _check_w(problem: Toy2dProblem, w) -> torch.Tensor:
    if len(w) != problem.k:
        raise UsageError(f"--w has {len(w)} weights {list(w)} but the spec has {problem.k} "
                         "rewards; give one weight per reward")
    if not all(math.isfinite(v) for v in w):
        raise UsageError(f"--w {list(w)} must be finite")
    return torch.tensor(w, dtype=torch.float32)


def closed_form(problem: Toy2dProblem, w: Sequence[float]) -> dict:
    """Optimum, pretrained objective, and the exact tilted target's reward and KL."""
    target, log_z = problem.tilted(list(w))
    w = list(w)
    pre_r = sum(wi * r for wi, r in zip(w, problem.expected_rewards(problem.mixture),
                                        strict=True))
    tgt = problem.expected_rewards(target)
    tgt_rw = sum(wi * r for wi, r in zip(w, tgt, strict=True))
    return {"optimum_objective": problem.alpha * log_z, "pretrained_objective": pre_r,
            "target_mean_rewards": tgt, "target_kl": tgt_rw / problem.alpha - log_z}


def evaluate_expert(problem: Toy2dProblem, policy: nn.Module, w: Sequence[float], n: int,
                    seed: int,
            steps: int | None) -> dict:
    """The expert against the closed form, on ``n`` fresh trajectories."""
    task = Task(policy, problem.base_denoiser(), lambda x, **_: problem.rewards_of(
        x.double()) @ torch.tensor(list(w), dtype=torch.float64), problem.schedule,
        (problem.mixture.dim,))
    ev = evaluate(task, iteration_seeds(seed, 0, n, EVAL_OFFSET), steps, problem.alpha,
                  basis=lambda x: problem.rewards_of(x.double()))
    cf = closed_form(problem, w)
    gain = cf["optimum_objective"] - cf["pretrained_objective"]
    ratio = gain > 0   # a constant reward (w = 0) has nothing to gain: no ratio
    return {
        "mean_rewards": ev["basis_rewards"], "stderr_rewards": ev["basis_stderr"],
        "path_kl": ev["path_kl"], "path_kl_stderr": ev["path_kl_stderr"],
        "objective": ev["objective"], "objective_stderr": ev["objective_stderr"], **cf,
        "gain_ratio": (ev["objective"] - cf["pretrained_objective"]) / gain if ratio else None,
        "gain_ratio_stderr": ev["objective_stderr"] / gain if ratio else None,
        "eval_trajectories": n,
    }


def finetune_toy2d(problem: Toy2dProblem, cfg: FinetuneConfig, out: str | Path,
                   resume: bool = False, overwrite: bool = False, progress: bool = True,
                   stop_after: int | None = None) -> dict:
    """Train an expert for ``r_w`` at ``cfg.alpha``, save it, and measure it (the CLI's JSON)."""
    problem = problem.with_alpha(cfg.alpha)
    task = make_task(problem, cfg)
    meta = {"domain": "toy2d", "spec": problem.spec, "w": list(cfg.w), "alpha": cfg.alpha,
            "base_sha256": base_hash(problem)}
    start = time.perf_counter()
    last = train(task, cfg, out, meta, resume, overwrite, progress, stop_after)
    seconds = time.perf_counter() - start
    out = Path(out)
    if last.get("iteration", cfg.iterations) < cfg.iterations and not last.get("converged"):
        return {"stopped_at": last["iteration"], "seconds": seconds}
    save_expert(out, task.policy, meta | {"config": cfg.to_dict()})
    result = {"estimator": cfg.estimator, "kl_mode": cfg.kl_mode, "w": list(cfg.w),
              "alpha": cfg.alpha, "iterations": last.get("iteration", cfg.iterations),
              "converged": bool(last.get("converged")),
              **evaluate_expert(problem, task.policy, cfg.w, cfg.eval_trajectories, cfg.seed,
                        cfg.sample_steps), "seconds": seconds}
    write_json(out / "result.json", result)
    return result


def load_expert(path: str | Path, problem: Toy2dProblem) -> TrainedExpert:
    """Load ``expert.safetensors`` from a run directory; refuse one trained on another base."""
    path = Path(path)
    state, meta = load_weights(path / "expert.safetensors", "dblend finetune toy2d --out DIR")
    if meta.get("base_sha256") != base_hash(problem):
        raise UsageError(f"expert {path} was trained on another base (base_sha256 "
                         f"{str(meta.get('base_sha256'))[:12]}... != {base_hash(problem)[:12]}...)")
    cfg = FinetuneConfig.from_dict(meta["config"])
    model = CorrectionMLP(problem.base_denoiser(), problem.mixture.dim, problem.schedule.T,
                          cfg.hidden)
    load_trainable(model, state)
    model.eval().requires_grad_(False)
    return TrainedExpert(model, list(meta["w"]), float(meta["alpha"]), path)
