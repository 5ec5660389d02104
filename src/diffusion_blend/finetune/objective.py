"""What every estimator shares: the task, rollouts of the chain, and the objective's estimate.

Per trajectory the objective is ``r_w(x0) - alpha * sum_t KL_t``, each ``KL_t`` the closed-form KL
between the fine-tuned and pretrained step laws at the visited state (same variance). The last
DDPM step is noise-free; its KL uses that step's beta, so moving ``x0`` there is not free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion_blend.blend import Denoiser
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import (
    Schedule,
    Step,
    chain_noise,
    chain_steps,
    ddpm_kl_weight,
    run_steps,
    step_from_eps,
)

if TYPE_CHECKING:
    from diffusion_blend.finetune.config import FinetuneConfig

RewardFn = Callable[..., torch.Tensor]


@dataclass
class Task:
    """A fine-tuning problem: the trainable ``policy``, the frozen ``reference``, the reward.

    ``reward(x0, **cond) -> [B]`` is the scalar reward being maximised (``r_w``); ``cond(seeds)``
    gives per-sample conditioning (e.g. class labels), or ``None``.
    """

    policy: nn.Module
    reference: Denoiser
    reward: RewardFn
    schedule: Schedule
    shape: tuple[int, ...]
    differentiable: bool = True
    cond: Callable[[Sequence[int]], dict] | None = None
    device: torch.device | str = "cpu"
    freeze_last_step: bool = False  # the last, noise-free step stays the pretrained map
    sync_grads: Callable = lambda params: None  # averages gradients across processes

    def conditioning(self, seeds: Sequence[int]) -> dict:
        return self.cond(seeds) if self.cond is not None else {}


def iteration_seeds(seed: int, iteration: int, n: int, offset: int = 0) -> list[int]:
    """Per-sample seeds of one iteration: a pure function of (seed, iteration), so resuming a
    run replays exactly the trajectories of an uninterrupted one."""
    if not 0 <= int(seed) < 2**24:
        raise UsageError(f"seed={seed} is not allowed; a run's seed is 0 ... 2**24 - 1")
    base = (int(seed) << 40) + offset + iteration * n
    return list(range(base, base + n))


def predictions(task: Task, x: torch.Tensor, t: torch.Tensor, cond: dict,
                frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps_policy, eps_reference)`` at ``x``; one shared evaluation when the policy offers
    ``pair`` (a correction on top of the reference), two forwards otherwise. ``frozen``: the
    policy takes the reference's step (used for a frozen last step)."""
    if frozen:
        ref = task.reference(x, t, **cond)
        return ref, ref
    if hasattr(task.policy, "pair") and not cond:
        return task.policy.pair(x, t)
    return task.policy(x, t, **cond), task.reference(x, t, **cond)


def kl_step(policy_eps: torch.Tensor, ref_eps: torch.Tensor, x: torch.Tensor, abar_t: float,
            abar_s: float, noise: torch.Tensor) -> tuple:
    """One DDPM step with the policy; its KL to the reference's step at the same ``x``.

    The two means differ by ``coef * (eps_policy - eps_ref)`` (the step is affine in eps).
    """
    out = step_from_eps(policy_eps, x, abar_t, abar_s, noise)
    diff = (policy_eps - ref_eps).flatten(1)
    return out, diff.pow(2).sum(1) * ddpm_kl_weight(abar_t, abar_s)


@torch.no_grad()
def evaluate(task: Task, seeds: Sequence[int], steps: int | None, alpha: float,
             basis: Callable[[torch.Tensor], torch.Tensor] | None = None,
             chunk: int = 4096) -> dict:
    """Per-trajectory reward, path KL and objective on fresh trajectories (means, stderrs)."""
    r, kl, b = trajectories(task, seeds, steps, basis, chunk)
    obj = r - alpha * kl
    n = len(r)
    out = {"reward": float(r.mean()), "reward_stderr": float(r.std() / n**0.5),
           "path_kl": float(kl.mean()), "path_kl_stderr": float(kl.std() / n**0.5),
           "objective": float(obj.mean()), "objective_stderr": float(obj.std() / n**0.5)}
    if b is not None:
        out["basis_rewards"], out["basis_stderr"] = b.mean(0).tolist(), (b.std(0) / n**0.5).tolist()
    return out


@torch.no_grad()
def trajectories(task: Task, seeds: Sequence[int], steps: int | None,
                 basis: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each trajectory's reward and path KL (float64), and its basis rewards when asked."""
    rewards, kls, bases = [], [], []
    for i in range(0, len(seeds), chunk):
        x0, kl, cond = run_chain(task, list(seeds[i:i + chunk]), steps)
        rewards.append(task.reward(x0, **cond).double())
        kls.append(kl.double())
        if basis is not None:
            bases.append(basis(x0).double())
    return torch.cat(rewards), torch.cat(kls), torch.cat(bases) if bases else None


def run_chain(task: Task, seeds: Sequence[int], steps: int | None, tracked_from: int = 0,
              grad_checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample with the policy: final states, each trajectory's summed KL to the reference, and
    the conditioning. Steps before ``tracked_from`` run without gradient (truncated backprop);
    with ``grad_checkpointing`` each tracked step is recomputed in the backward pass."""
    plan = chain_steps(task.schedule, steps)
    noise = chain_noise(seeds, len(plan), task.shape, device=task.device)
    cond = task.conditioning(seeds)
    total, grad = [torch.zeros(len(seeds), device=task.device)], torch.is_grad_enabled()

    def one(st: Step, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tracked = grad and st.k >= tracked_from
        args = (x, z, st, cond, task.freeze_last_step and st.last)
        with torch.set_grad_enabled(tracked):
            if tracked and grad_checkpointing:
                x, kl = checkpoint(_chain_step, task, *args, use_reentrant=False)
            else:
                x, kl = _chain_step(task, *args)
        total[0] = total[0] + kl
        return x

    x = run_steps(one, noise[:, 0], plan, noise)
    return x, total[0], cond


def _chain_step(task: Task, x, noise, st: Step, cond, frozen):
    tt = st.timesteps(x.shape[0], x.device)
    out, kl = kl_step(*predictions(task, x, tt, cond, frozen), x, st.abar_t, st.abar_s, noise)
    return out.x, kl


def scaled_reward(task: Task, cfg: FinetuneConfig, x0: torch.Tensor,
                  cond: dict) -> torch.Tensor:
    """``reward_scale * r(x0)``, clipped to ``[-reward_clip, reward_clip]`` when set."""
    r = cfg.reward_scale * task.reward(x0, **cond)
    return r if cfg.reward_clip is None else r.clamp(-cfg.reward_clip, cfg.reward_clip)
