"""What a domain is to everything above it (sampling, sweeps, the demo, the UI, benchmarks).

A domain owns its pretrained model and its experts (loaded by name), the conditioning of each
seed, the basis rewards (normalised as the experts were trained), the chain to sample (its
schedule, shape and number of steps), and how samples are shown. The methods are built from
these parts (``evaluation.methods``); a domain adds only what needs its weights: the blend's
fast path, the weight-space soup, the MORL fine-tunes it holds and, where it is known, the
exact target. To add a domain, write one module in ``domains/`` with a class of this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from diffusion_blend.blend import Denoiser, Preference
from diffusion_blend.sampling import Schedule


@dataclass(frozen=True)
class ExactTarget:
    """The exact tilted target ``p_pre exp(lam r_w / alpha) / Z`` where it is known in closed
    form: exact samples per seed, its expected rewards (in the domain's reward basis), ``log Z``."""

    sample: Callable[[list[int]], torch.Tensor]
    mean_rewards: list[float]
    log_z: float


class Domain(Protocol):
    """A base, K experts (one per basis reward) and everything needed to sample and score."""

    name: str
    reward_names: list[str]   # one per expert: the blend's basis
    alpha: float              # the experts' KL strength (the SMC target's temperature)
    schedule: Schedule
    shape: tuple[int, ...]    # one sample (toy2d: a point; images: C x H x W; sd: latents)
    steps: int                # sampling steps of the chain
    base: Denoiser
    experts: list[Denoiser]
    differentiable: bool      # the rewards have gradients (reward-gradient guidance needs them)

    def cond(self, seeds: list[int]) -> dict:
        """The conditioning of each seed (class, prompt embeddings; ``{}`` if none)."""

    def strata(self, seeds: list[int]) -> torch.Tensor | None:
        """Each seed's stratum where the seed fixes the conditioning (class or prompt ``s % n``:
        a balanced design, so standard errors count only the spread within); None: iid seeds."""

    def rewards(self, x0: torch.Tensor, **cond) -> torch.Tensor:
        """Each basis reward of each sample, ``[B, K]``."""

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        """The samples as shown (decoded latents; points and pixels as they are)."""

    def blend(self, pref: Preference) -> Denoiser:
        """DB-MPA / DB-KLA of the experts at ``pref``."""

    def soup(self, coefs: list[float]) -> Denoiser:
        """One model whose weights are ``theta_pre + sum_i c_i (theta_i - theta_pre)``."""

    def morl(self, pref: Preference) -> Denoiser | None:
        """The model fine-tuned for ``r_w`` at ``lam`` itself, where the domain holds one."""

    def amortised(self, pref: Preference) -> Denoiser | None:
        """The one preference-conditioned network, where one was distilled."""

    def conditioned(self, pref: Preference) -> Denoiser | None:
        """The same network trained directly by fine-tuning on ``lam w . r`` with preferences
        drawn per trajectory (``conditioned-rl``), where one was trained."""

    def target(self, pref: Preference) -> ExactTarget | None:
        """The exact target of ``pref`` where it is known in closed form (toy2d)."""

    def params(self, parts: list[str]) -> int:
        """Parameters held to run ``parts`` (``base``, ``expert{i}``, ``soup``, ``morl``)."""
