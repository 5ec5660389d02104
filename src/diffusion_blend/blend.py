"""The core of Diffusion Blend: a preference ``(w, lam)`` and denoisers that blend other denoisers.

A *denoiser* is any callable ``denoiser(x, t, **cond) -> prediction``. The prediction may be a
noise prediction ``eps``, a ``v`` prediction or a flow velocity: the blend is affine in it, so it
does not care which. With ``eps_pre`` the pretrained model and ``eps_i`` the expert fine-tuned for
basis reward ``r_i`` (all at the same KL strength ``alpha``):

    eps_blend = eps_pre + lam * sum_i w_i (eps_i - eps_pre)

``w`` picks the trade-off between rewards (DB-MPA), ``lam`` scales the distance from the
pretrained model (DB-KLA: the blend targets KL strength ``alpha / lam``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.seeding import sample_uniforms

Denoiser = Callable[..., torch.Tensor]


class PreferenceError(UsageError):
    """A preference that is not allowed (bad length, not finite, extrapolation not asked for)."""


@dataclass(frozen=True)
class Preference:
    """Weights ``w`` over the basis rewards and the KL-strength modifier ``lam``.

    Negative weights, ``lam > 1`` and ``lam * sum(w) > 1`` (a negative coefficient on the
    pretrained model) extrapolate beyond what the experts were trained for; they are refused
    unless ``allow_extrapolation`` is set.
    """

    w: tuple[float, ...]
    lam: float = 1.0
    allow_extrapolation: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", tuple(float(v) for v in self.w))
        object.__setattr__(self, "lam", float(self.lam))
        self._check()

    def _check(self) -> None:
        if len(self.w) == 0:
            raise PreferenceError("w is empty; give one weight per expert")
        bad = [v for v in self.w if not math.isfinite(v)]
        if bad:
            raise PreferenceError(f"w={list(self.w)} contains {bad[0]}; weights must be finite")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise PreferenceError(f"lam={self.lam} is not allowed; lam must be finite and >= 0")
        if not math.isfinite(self.lam * sum(abs(v) for v in self.w)):
            raise PreferenceError(f"w={list(self.w)} with lam={self.lam} overflows; use smaller "
                                  "values")
        if self.allow_extrapolation:
            return
        if any(v < 0 for v in self.w):
            raise PreferenceError(
                f"w={list(self.w)} has a negative weight, which extrapolates beyond the experts; "
                "use weights >= 0 or allow extrapolation (--allow-extrapolation)"
            )
        if self.lam > 1:
            raise PreferenceError(
                f"lam={self.lam} > 1 extrapolates beyond the experts' KL strength; "
                "use 0 <= lam <= 1 or allow extrapolation (--allow-extrapolation)"
            )
        if self.lam * sum(self.w) > 1 + 1e-9:
            raise PreferenceError(
                f"w={list(self.w)} with lam={self.lam}: lam * sum(w) = "
                f"{self.lam * sum(self.w):g} > 1 gives the pretrained model a negative "
                "coefficient (extrapolation); use weights with lam * sum(w) <= 1 or allow "
                "extrapolation (--allow-extrapolation)"
            )

    @property
    def k(self) -> int:
        """Number of experts the preference is for."""
        return len(self.w)

    def coefficients(self) -> tuple[float, list[float]]:
        """``(c_pre, [c_i])`` with ``eps = c_pre * eps_pre + sum_i c_i eps_i``; they sum to one."""
        c = [self.lam * v for v in self.w]
        return 1.0 - sum(c), c

    def needs_base(self) -> bool:
        """False when ``lam * sum(w) == 1`` (float tolerance): the base term vanishes."""
        c_pre, _ = self.coefficients()
        return not math.isclose(c_pre, 0.0, abs_tol=1e-12)

    def check_k(self, k: int) -> None:
        """Raise unless the preference has exactly ``k`` weights."""
        _check_count(self.w, k)

    @classmethod
    def for_experts(cls, w: Sequence[float], k: int, lam: float = 1.0,
                    allow_extrapolation: bool = False) -> Preference:
        """A preference over ``k`` experts; a wrong count is reported before anything else."""
        _check_count(w, k)
        return cls(tuple(w), lam, allow_extrapolation)


def _check_count(w: Sequence[float], k: int) -> None:
    if len(w) != k:
        raise PreferenceError(f"w has {len(w)} weights {list(w)} but there are {k} experts")


def nfe_of(denoiser: Denoiser) -> float:
    """Network evaluations per sample of one call of ``denoiser`` (1 for a plain network)."""
    return float(getattr(denoiser, "nfe", 1.0))


class BlendedDenoiser:
    """``eps_pre + lam * sum_i w_i (eps_i - eps_pre)`` over a base and K expert denoisers.

    Terms with a zero coefficient are not evaluated: ``w = e_i, lam = 1`` runs expert i alone and
    ``lam = 0`` runs the base alone, so both reproduce those models exactly. The preference may be
    changed between calls (``blend.preference = ...``) without rebuilding anything.
    """

    def __init__(self, base: Denoiser | None, experts: Sequence[Denoiser], preference: Preference):
        self.base = base
        self.experts = list(experts)
        self.preference = preference

    @property
    def preference(self) -> Preference:
        return self._preference

    @preference.setter
    def preference(self, preference: Preference) -> None:
        preference.check_k(len(self.experts))
        if self.base is None and preference.needs_base():
            raise PreferenceError(
                f"preference {preference} needs the pretrained model (lam * sum(w) != 1) "
                "but none was given"
            )
        self._preference = preference

    def terms(self) -> list[tuple[float, Denoiser]]:
        """The ``(coefficient, denoiser)`` pairs that contribute, zero coefficients dropped."""
        c_pre, c = self.preference.coefficients()
        pairs = [(ci, e) for ci, e in zip(c, self.experts, strict=True) if ci != 0.0]
        if self.preference.needs_base():
            pairs.insert(0, (c_pre, self.base))
        return pairs

    @property
    def nfe(self) -> float:
        return sum(nfe_of(d) for _, d in self.terms())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        terms = self.terms()
        if len(terms) == 1 and terms[0][0] == 1.0:
            return terms[0][1](x, t, **cond)
        out = None
        for ci, d in terms:
            pred = ci * d(x, t, **cond)
            out = pred if out is None else out + pred
        return out


class StochasticBlend:
    """DB-MPA-LS: at each step each sample follows one expert drawn with probability ``w_i``.

    One network evaluation per step. The draws are keyed by the per-sample ``seeds`` and the
    timestep, so a sample's expert sequence does not depend on the batch it is in.
    """

    def __init__(
        self, experts: Sequence[Denoiser], w: Sequence[float], seeds: Sequence[int],
        num_timesteps: int,
    ):
        w_t = torch.tensor([float(v) for v in w], dtype=torch.float64)
        if len(w_t) != len(experts):
            raise PreferenceError(f"w has {len(w_t)} weights {list(w)} but there are "
                                  f"{len(experts)} experts")
        if (w_t < 0).any() or not math.isclose(float(w_t.sum()), 1.0, abs_tol=1e-9):
            raise PreferenceError(f"w={list(w)} must lie on the simplex (w_i >= 0, sum 1) "
                                  "for the stochastic blend")
        self.experts = list(experts)
        self.w = w_t
        self.seeds = list(seeds)
        u = sample_uniforms(self.seeds, (num_timesteps,), stream="blend-ls")
        self.table = torch.searchsorted(torch.cumsum(w_t, 0), u, right=True)
        self.table.clamp_(max=len(self.experts) - 1)

    @property
    def nfe(self) -> float:
        return float(sum(float(wi) * nfe_of(e) for wi, e in zip(self.w, self.experts, strict=True)))

    def choices(self, t: torch.Tensor) -> torch.Tensor:
        """Expert index per sample at timestep(s) ``t``."""
        t = t.reshape(-1).long().cpu()
        return self.table[torch.arange(len(self.seeds)), t.expand(len(self.seeds))]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if x.shape[0] != len(self.seeds):
            raise UsageError(f"batch of {x.shape[0]} rows but {len(self.seeds)} seeds")
        pick = self.choices(t).to(x.device)
        out = torch.empty_like(x)
        for i, expert in enumerate(self.experts):
            rows = (pick == i).nonzero(as_tuple=True)[0]
            if len(rows):
                b = x.shape[0]
                sub = {k: select_rows(v, rows, b) for k, v in cond.items()}
                out[rows] = expert(x[rows], select_rows(t, rows, b), **sub).to(out.dtype)
        return out


def select_rows(v: object, rows: torch.Tensor, batch: int) -> object:
    """``rows`` of a per-row conditioning value (a tensor whose first dimension is the
    ``batch``); anything else (scalars, a batch-1 tensor shared by every row, non-tensors)
    passes through unchanged."""
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
        return v[rows.to(v.device)]
    return v


class Guided:
    """Classifier-free guidance: ``eps_u + scale * (eps_c - eps_u)``, ``eps_u`` with ``null`` cond.

    Because the blend is affine with coefficients summing to one, blending guided predictions
    equals guiding the blended predictions (one guidance scale for all models).
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_cond: dict):
        self.denoiser, self.scale, self.null_cond = denoiser, float(scale), null_cond

    @property
    def nfe(self) -> float:
        return 2.0 * nfe_of(self.denoiser)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        eps_c = self.denoiser(x, t, **cond)
        eps_u = self.denoiser(x, t, **self.null_cond)
        return eps_u + self.scale * (eps_c - eps_u)
