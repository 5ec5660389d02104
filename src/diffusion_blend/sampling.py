"""DDPM / DDIM sampling as plain functions over any denoiser ``denoiser(x, t, **cond) -> eps``.

Notation: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, ``abar_t = prod_{s<=t} (1 - beta_s)``.
A step goes from timestep ``t`` to the previous kept timestep ``s`` (``abar_s = 1`` after the
last one). Each step is a Gaussian ``N(mean, var)``; the last DDPM step has ``var = 0``: it returns
the mean without noise. The samplers also give the log-prob of each step taken and the
closed-form KL to a reference denoiser's step (same variance: ``|mean - mean_ref|^2 / (2 var)``),
which policy-gradient fine-tuning needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusion_blend.blend import Denoiser, nfe_of
from diffusion_blend.errors import UsageError
from diffusion_blend.seeding import sample_normals

SAMPLERS = ("ddpm", "ddim")


SPACINGS = ("linear", "quadratic")


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule given by its betas (float64, index 0 is the least noisy) and
    how a shorter chain spaces its steps: ``linear`` evenly, ``quadratic`` as
    ``round((T - 1) (i / (n - 1))^2)``, dense near t = 0 (DDIM's quadratic spacing), where a
    short chain otherwise leaves the last details to one wide pretrained jump."""

    betas: torch.Tensor
    spacing: str = "linear"

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise UsageError(f"spacing {self.spacing!r} is not known; use one of "
                             f"{', '.join(SPACINGS)}")

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """Betas linear from ``beta_start`` to ``beta_end`` over ``T`` steps (DDPM's schedule)."""
        if T < 1 or not 0 < beta_start <= beta_end < 1:
            raise UsageError(f"schedule T={T}, beta_start={beta_start}, beta_end={beta_end}: "
                             "need T >= 1 and 0 < beta_start <= beta_end < 1")
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def abar(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, 0)

    def timesteps(self, steps: int | None = None) -> list[int]:
        """``steps`` timesteps over ``[0, T-1]`` by the spacing, noisiest first (all when None)."""
        steps = self.T if steps is None else int(steps)
        if not 1 <= steps <= self.T:
            raise UsageError(f"steps={steps} is not allowed; use 1 <= steps <= T={self.T}")
        if self.spacing == "linear" or steps == self.T:
            ts = torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long()
        else:       # dense near 0: with steps close to T, steps that round alike merge
            ts = ((self.T - 1) * torch.linspace(0, 1, steps, dtype=torch.float64) ** 2).round()
        return sorted(set(ts.long().tolist()), reverse=True)

    def transitions(self, steps: int | None = None) -> list[tuple[int, float, float]]:
        """``(t, abar_t, abar_s)`` for each step; ``abar_s = 1`` for the last (noise-free) step."""
        ts = self.timesteps(steps)
        abar = self.abar.tolist()
        prev = [abar[s] for s in ts[1:]] + [1.0]
        return [(t, abar[t], a_s) for t, a_s in zip(ts, prev, strict=True)]


# ---------------------------------------------------------------------------- one step


def _sqrt(v):
    """``sqrt`` of a python float or, elementwise, of a tensor (per-row ``abar``)."""
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def predict_x0(eps: torch.Tensor, x: torch.Tensor, abar_t: float | torch.Tensor) -> torch.Tensor:
    """The clean sample implied by ``eps``: ``(x - sqrt(1-abar_t) eps) / sqrt(abar_t)``."""
    return (x - _sqrt(1.0 - abar_t) * eps) / _sqrt(abar_t)


def to_eps(pred: torch.Tensor, x: torch.Tensor, abar_t: float, kind: str = "eps") -> torch.Tensor:
    """Convert a ``v`` prediction to ``eps`` (``eps = sqrt(abar) v + sqrt(1-abar) x``)."""
    if kind == "eps":
        return pred
    if kind == "v":
        return math.sqrt(abar_t) * pred + math.sqrt(1.0 - abar_t) * x
    raise UsageError(f"prediction type {kind!r} is not supported; use 'eps' or 'v'")


def ddpm_step(eps: torch.Tensor, x: torch.Tensor, abar_t: float, abar_s: float,
              clip_x0: float | None = None) -> tuple[torch.Tensor, float]:
    """DDPM ancestral step: the posterior ``q(x_s | x_t, x0_hat)``, variance ``beta_tilde``.

    ``abar_t``, ``abar_s`` are floats, or tensors broadcastable to ``x`` (one step per row).
    """
    beta = 1.0 - abar_t / abar_s
    x0 = _clip(predict_x0(eps, x, abar_t), clip_x0)
    mean = (_sqrt(abar_s) * beta / (1.0 - abar_t)) * x0 \
        + (_sqrt(1.0 - beta) * (1.0 - abar_s) / (1.0 - abar_t)) * x
    return mean, (1.0 - abar_s) / (1.0 - abar_t) * beta


def ddpm_mean_eps_coef(abar_t: float, abar_s: float) -> float:
    """``d mean / d eps`` of the DDPM step (a scalar): two predictions ``eps_a``, ``eps_b`` at the
    same state give means differing by ``-coef * (eps_a - eps_b)``."""
    beta = 1.0 - abar_t / abar_s
    return _sqrt(abar_s) * beta / (1.0 - abar_t) * _sqrt(1.0 - abar_t) / _sqrt(abar_t)


def ddpm_kl_weight(abar_t: float, abar_s: float) -> float:
    """``KL / |eps_a - eps_b|^2`` between the DDPM step laws of two predictions at the same
    state: ``coef^2 / (2 var)`` (the last, noise-free step's var taken as its beta, as
    ``step_from_eps`` does). Weighting a regression of eps by it makes the loss the path KL."""
    beta = 1.0 - abar_t / abar_s
    var = (1.0 - abar_s) / (1.0 - abar_t) * beta
    return ddpm_mean_eps_coef(abar_t, abar_s) ** 2 / (2.0 * (var if var > 0 else beta))


def ddim_step(eps: torch.Tensor, x: torch.Tensor, abar_t: float, abar_s: float, eta: float,
              clip_x0: float | None = None) -> tuple[torch.Tensor, float]:
    """DDIM step with stochasticity ``eta`` (0: deterministic, 1: same law as DDPM)."""
    var = eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
    x0 = _clip(predict_x0(eps, x, abar_t), clip_x0)
    mean = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - var, 0.0)) * eps
    return mean, var


def _clip(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor,
                     var: float | torch.Tensor) -> torch.Tensor:
    """Log-density per sample of ``N(mean, var I)`` at ``x`` (summed over non-batch dims).

    ``var`` is a float or a per-row tensor.
    """
    d = x[0].numel()
    var = _per_row(var, x.shape[0])
    sq = (x - mean).flatten(1).pow(2).sum(1)
    log_var = var.log() if isinstance(var, torch.Tensor) else math.log(var)
    return -0.5 * sq / var - 0.5 * d * (math.log(2 * math.pi) + log_var)


def gaussian_kl(mean_a: torch.Tensor, mean_b: torch.Tensor,
                var: float | torch.Tensor) -> torch.Tensor:
    """``KL(N(mean_a, var I) || N(mean_b, var I))`` per sample (``var`` float or per row)."""
    return (mean_a - mean_b).flatten(1).pow(2).sum(1) / (2.0 * _per_row(var, mean_a.shape[0]))


def _per_row(var, b: int):
    return var.reshape(b) if isinstance(var, torch.Tensor) else var


@dataclass
class StepOut:
    """One step: the state reached, its Gaussian ``(mean, var)``, and the KL variance used."""

    x: torch.Tensor
    mean: torch.Tensor
    var: float
    kl_var: float


def step(
    denoiser: Denoiser, x: torch.Tensor, t: int, abar_t: float, abar_s: float,
    noise: torch.Tensor | None, eta: float = 1.0, sampler: str = "ddpm",
    clip_x0: float | None = None, cond: dict | None = None,
) -> StepOut:
    """One reverse step of ``sampler`` from timestep ``t``; ``noise`` is used when ``var > 0``."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps = denoiser(x, tt, **(cond or {}))
    return step_from_eps(eps, x, abar_t, abar_s, noise, eta, sampler, clip_x0)


def step_from_eps(eps: torch.Tensor, x: torch.Tensor, abar_t: float, abar_s: float,
                  noise: torch.Tensor | None, eta: float = 1.0, sampler: str = "ddpm",
                  clip_x0: float | None = None) -> StepOut:
    """The step law from a noise prediction, then ``x_s = mean + sqrt(var) * noise``."""
    if sampler == "ddpm":
        mean, var = ddpm_step(eps, x, abar_t, abar_s, clip_x0)
    elif sampler == "ddim":
        mean, var = ddim_step(eps, x, abar_t, abar_s, eta, clip_x0)
    else:
        raise UsageError(f"sampler {sampler!r} is not known; use one of {SAMPLERS}")
    x_s = mean if var == 0.0 or noise is None else mean + math.sqrt(var) * noise
    # A noise-free step (the last DDPM step, or DDIM eta=0) has no density; its KL is taken
    # with the step's own beta, so moving x0 there is not free.
    return StepOut(x_s, mean, var, var if var > 0 else 1.0 - abar_t / abar_s)


# ---------------------------------------------------------------------------- whole chains


@dataclass(frozen=True)
class Step:
    """One transition of a chain: index ``k`` (0 is the noisiest), timestep ``t``, ``abar_t``,
    ``abar_s`` (1 after the last step) and whether it is the last."""

    k: int
    t: int
    abar_t: float
    abar_s: float
    last: bool

    def timesteps(self, b: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``t`` for a batch of ``b`` rows (what a denoiser is called with)."""
        return torch.full((b,), self.t, dtype=torch.long, device=device)


def chain_steps(schedule: Schedule, steps: int | None) -> list[Step]:
    """The ``Step`` of each transition of a ``steps``-step chain, noisiest first."""
    pairs = schedule.transitions(steps)
    return [Step(k, t, a_t, a_s, k == len(pairs) - 1) for k, (t, a_t, a_s) in enumerate(pairs)]


def chain_noise(seeds: Sequence[int], n_steps: int, shape: tuple[int, ...],
                stream: str = "noise", dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Each seed's noise for a chain, ``[B, n_steps + 1, *shape]``: the initial state ``x_T``,
    then one draw per step (drawn at once, so a sample does not depend on its batch)."""
    return sample_normals(seeds, (n_steps + 1, *shape), stream, dtype).to(device)


StepFn = Callable[[Step, torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[Step, torch.Tensor], torch.Tensor | None]


def run_steps(step_fn: StepFn, x: torch.Tensor, steps: list[Step], noise: torch.Tensor,
              callback: Callback | None = None, progress: bool = False,
              desc: str = "sampling") -> torch.Tensor:
    """The one reverse-chain loop (k-diffusion's habit): ``x = step_fn(step, x, noise_k)`` for
    each step, noisiest first, then ``callback(step, x)``, which may return a replacement state
    (CoDe's selection) or ``None``. Sampling, SMC, CoDe, DPOK's rollouts and the fine-tuning
    chains are all this loop with their own step."""
    for st in tqdm(steps, disable=not progress, desc=desc):
        x = step_fn(st, x, noise[:, st.k + 1])
        new = None if callback is None else callback(st, x)
        x = x if new is None else new
    return x


@dataclass
class SampleResult:
    """Final samples, cost, and per-step log-probs / KLs (``[steps, B]``) when asked for."""

    x0: torch.Tensor
    nfe_per_sample: float
    logprobs: torch.Tensor | None = None
    kls: torch.Tensor | None = None
    states: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def sample(
    denoiser: Denoiser, schedule: Schedule, seeds: Sequence[int], shape: tuple[int, ...],
    steps: int | None = None, sampler: str = "ddpm", eta: float = 1.0,
    cond: dict | None = None, reference: Denoiser | None = None, record: bool = False,
    clip_x0: float | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", progress: bool = False, callback: Callback | None = None,
) -> SampleResult:
    """Run the reverse chain from per-sample seeded noise.

    ``reference``: also return the per-step KL to that denoiser's step (costs its NFE too).
    ``record``: also return per-step log-probs and the visited states ``x_T, ..., x_0``.
    ``callback(step, x)``: called after each step (see ``run_steps``).
    """
    if sampler not in SAMPLERS:
        raise UsageError(f"sampler {sampler!r} is not known; use one of {SAMPLERS}")
    plan = chain_steps(schedule, steps)
    noise = chain_noise(seeds, len(plan), shape, dtype=dtype, device=device)
    logps, kls, states = [], [], [noise[:, 0]] if record else []

    def one(st: Step, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = step(denoiser, x, st.t, st.abar_t, st.abar_s, z, eta, sampler, clip_x0, cond)
        if reference is not None:
            ref = step(reference, x, st.t, st.abar_t, st.abar_s, None, eta, sampler, clip_x0,
                       cond)
            kls.append(gaussian_kl(out.mean, ref.mean, out.kl_var))
        if record:
            logps.append(_step_logprob(out))
            states.append(out.x)
        return out.x

    x = run_steps(one, noise[:, 0], plan, noise, callback, progress)
    nfe = len(plan) * (nfe_of(denoiser) + (nfe_of(reference) if reference is not None else 0))
    return SampleResult(
        x0=x, nfe_per_sample=nfe,
        logprobs=torch.stack(logps) if record else None,
        kls=torch.stack(kls) if reference is not None else None,
        states=states,
    )


def _step_logprob(out: StepOut) -> torch.Tensor:
    """Log-prob of the step taken; 0 for a deterministic step (a map, not a density)."""
    if out.var == 0.0:
        return torch.zeros(out.x.shape[0], dtype=out.x.dtype, device=out.x.device)
    return gaussian_logprob(out.x, out.mean, out.var)
