"""DPOK estimator: policy gradient over the stochastic sampling chain, PPO-style.

Each stochastic step is a Gaussian policy ``N(mean_theta(x_t), var_t)``. A batch of trajectories
is rolled out once, then updated on for a few epochs with a clipped importance ratio. The loss
per transition is ``-min(rho A, clip(rho) A) + alpha * KL_t(theta)`` with the closed-form KL at
the stored state. Two returns:

* ``published`` (DPOK as published): ``G_t = r(x0)``. The KL's gradient is taken only at the
  stored states, ignoring how an action changes the KL paid later: it under-tilts.
* ``to-go`` (default): ``G_t = r(x0) - alpha * sum of the KL of the later steps``: the exact
  policy gradient of the regularised objective.

The advantage is ``G_t - V(x_t, t)`` with a learned value network, or ``G_t`` minus the batch
mean at that step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_blend.blend import select_rows
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task, predictions, scaled_reward
from diffusion_blend.sampling import (
    Step,
    chain_noise,
    chain_steps,
    ddpm_step,
    gaussian_kl,
    gaussian_logprob,
    run_steps,
    step_from_eps,
)


@dataclass
class Rollout:
    """A batch of trajectories: per step ``k`` (noisiest first) the state, action and laws."""

    states: torch.Tensor      # [S, B, *shape]  x_t
    actions: torch.Tensor     # [S, B, *shape]  x_s reached
    old_logp: torch.Tensor    # [S, B]          0 where the step is noise-free
    ref_means: torch.Tensor   # [S, B, *shape]  pretrained step mean at x_t
    kl: torch.Tensor          # [S, B]
    reward: torch.Tensor      # [B]
    timesteps: torch.Tensor   # [S]
    abar_t: torch.Tensor      # [S]
    abar_s: torch.Tensor      # [S]
    stochastic: torch.Tensor  # [S] bool
    cond: dict


@torch.no_grad()
def rollout(task: Task, cfg: FinetuneConfig, seeds: list[int]) -> Rollout:
    """Sample trajectories with the current policy and record what the update needs."""
    plan = chain_steps(task.schedule, cfg.sample_steps)
    noise = chain_noise(seeds, len(plan), task.shape, device=task.device)
    cond = task.conditioning(seeds)
    rec = {k: [] for k in ("states", "actions", "old_logp", "ref_means", "kl", "stochastic")}

    def one(st: Step, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = st.timesteps(len(seeds), task.device)
        eps, eps_ref = predictions(task, x, tt, cond, task.freeze_last_step and st.last)
        out = step_from_eps(eps, x, st.abar_t, st.abar_s, z)
        ref = step_from_eps(eps_ref, x, st.abar_t, st.abar_s, None)
        lp = gaussian_logprob(out.x, out.mean, out.var) if out.var > 0 else torch.zeros_like(
            out.x.flatten(1)[:, 0])
        for key, v in (("states", x), ("actions", out.x), ("old_logp", lp),
                       ("ref_means", ref.mean), ("kl", gaussian_kl(out.mean, ref.mean,
                                                                   out.kl_var)),
                       ("stochastic", out.var > 0)):
            rec[key].append(v)
        return out.x

    r = scaled_reward(task, cfg, run_steps(one, noise[:, 0], plan, noise), cond)
    return Rollout(
        **{k: torch.stack(v) if k != "stochastic" else torch.tensor(v) for k, v in rec.items()},
        reward=r, timesteps=torch.tensor([st.t for st in plan]),
        abar_t=torch.tensor([st.abar_t for st in plan]),
        abar_s=torch.tensor([st.abar_s for st in plan]), cond=cond)


def returns(ro: Rollout, cfg: FinetuneConfig) -> torch.Tensor:
    """``G`` per step and trajectory ([S, B]), in the scaled reward's units."""
    G = ro.reward.expand_as(ro.kl).clone()
    if cfg.kl_mode == "to-go":
        later = ro.kl.flip(0).cumsum(0).flip(0) - ro.kl       # sum over the steps after k
        G = G - cfg.reward_scale * cfg.alpha * later
    return G


class ValueNet(nn.Module):
    """``V(x_t, t)``: the expected return from a state, used as the per-step baseline."""

    def __init__(self, dim: int, T: int, hidden: int = 64):
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.float() / self.T)[:, None]
        return self.net(torch.cat([x.flatten(1), s, s.sqrt()], 1))[:, 0]


def advantages(ro: Rollout, G: torch.Tensor, cfg: FinetuneConfig,
               value: ValueNet | None, value_opt: torch.optim.Optimizer | None,
               gen: torch.Generator,
               sync: Callable = lambda params: None) -> torch.Tensor:
    """``G - baseline`` per step and trajectory; the value net is fitted after it is used."""
    if cfg.advantage == "batch" or value is None:
        return G - G.mean(1, keepdim=True)
    S, B = G.shape
    xs, ts = ro.states.flatten(0, 1), ro.timesteps.repeat_interleave(B)
    with torch.no_grad():
        A = G - value(xs, ts).reshape(S, B)
    target = G.reshape(-1)
    for _ in range(cfg.value_epochs):
        for idx in torch.randperm(S * B, generator=gen).chunk(cfg.minibatches):
            loss = (value(xs[idx], ts[idx]) - target[idx]).pow(2).mean()
            value_opt.zero_grad()
            loss.backward()
            sync(value.parameters())
            value_opt.step()
    return A


def update_batches(ro: Rollout, cfg: FinetuneConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Minibatches of flat transition indices ``k * B + b`` for one epoch.

    A ``timestep_fraction`` share of the stochastic steps is used, plus every noise-free step
    (those carry only the KL term) unless it is frozen to the pretrained model.
    """
    S, B = ro.kl.shape
    stoch = ro.stochastic.nonzero()[:, 0]
    keep = stoch[torch.randperm(len(stoch), generator=gen)[:max(1, round(
        cfg.timestep_fraction * len(stoch)))]]
    fixed = (~ro.stochastic).nonzero()[:, 0]
    steps = keep if cfg.freeze_last_step else torch.cat([keep, fixed])
    flat = (steps[:, None] * B + torch.arange(B)).reshape(-1)
    return list(flat[torch.randperm(len(flat), generator=gen)].chunk(cfg.minibatches))


def dpok_update(task: Task, cfg: FinetuneConfig, ro: Rollout, A: torch.Tensor,
                optimizer: torch.optim.Optimizer, gen: torch.Generator,
                step: Callable[[], None]) -> dict:
    """PPO epochs over the rollout; returns the mean clipped fraction and last loss."""
    S, B = ro.kl.shape
    flat = {"x": ro.states.flatten(0, 1), "a": ro.actions.flatten(0, 1),
            "ref": ro.ref_means.flatten(0, 1), "lp": ro.old_logp.reshape(-1),
            "A": A.reshape(-1)}
    k_of = torch.arange(S).repeat_interleave(B)
    clipped, loss_val = [], 0.0
    for _ in range(cfg.ppo_epochs):
        for idx in update_batches(ro, cfg, gen):
            loss, frac = _transition_loss(task, cfg, ro, flat, k_of, idx, B)
            optimizer.zero_grad()
            loss.backward()
            step()   # sync, clip, step (skipped when the gradient is not finite)
            clipped.append(frac)
            loss_val = float(loss.detach())
    return {"clip_fraction": sum(clipped) / max(len(clipped), 1), "loss": loss_val}


def _transition_loss(task, cfg, ro: Rollout, flat: dict, k_of, idx, B: int):
    k = k_of[idx]
    shape = (-1,) + (1,) * len(task.shape)
    a_t, a_s = ro.abar_t[k].reshape(shape).to(task.device), ro.abar_s[k].reshape(shape).to(
        task.device)
    cond = {n: select_rows(v, idx % B, B) for n, v in ro.cond.items()}
    eps = task.policy(flat["x"][idx], ro.timesteps[k].to(task.device), **cond)
    mean, var = ddpm_step(eps, flat["x"][idx], a_t.to(eps.dtype), a_s.to(eps.dtype))
    stoch = ro.stochastic[k].to(task.device)
    beta = 1.0 - a_t / a_s
    kl_var = torch.where(stoch.reshape(shape), var, beta.to(var.dtype))
    kl = gaussian_kl(mean, flat["ref"][idx], kl_var)
    safe_var = torch.where(stoch.reshape(shape), var, torch.ones_like(var))
    logp = gaussian_logprob(flat["a"][idx], mean, safe_var)
    ratio = torch.exp((logp - flat["lp"][idx]).clamp(max=20.0))
    adv = flat["A"][idx]
    pg = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip) * adv)
    pg = torch.where(stoch, pg, torch.zeros_like(pg))
    per = -pg + cfg.reward_scale * cfg.alpha * kl
    frac = float(((ratio - 1).abs() > cfg.ppo_clip)[stoch].float().mean()) if stoch.any() else 0.0
    return per.sum() / B, frac


def dpok_stats(ro: Rollout, cfg: FinetuneConfig) -> dict:
    path_kl = ro.kl.sum(0)
    r = ro.reward / cfg.reward_scale
    return {"reward": float(r.mean()), "path_kl": float(path_kl.mean()),
            "objective": float((r - cfg.alpha * path_kl).mean())}
