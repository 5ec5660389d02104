"""The exact testbed: a Gaussian-mixture base with linear and quadratic rewards.

Everything the blend approximates is available in closed form here: the noised marginal (so the
exact pretrained ``eps``), the tilted target ``p_pre * exp(sum_i c_i r_i / alpha) / Z`` (again a
mixture), its log normaliser, its expected rewards and exact samples. The exact expert for
reward ``r_i`` is the exact denoiser of the mixture tilted by ``r_i``. Nothing assumes 2-D; the
dimension comes from the means.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_blend.blend import BlendedDenoiser, Denoiser, Preference
from diffusion_blend.domains.base import ExactTarget
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import Schedule
from diffusion_blend.seeding import sample_normals, sample_uniforms

F64 = torch.float64


class SpecError(UsageError):
    """A toy2d problem spec that is malformed or describes an impossible problem."""


# ---------------------------------------------------------------------------- the mixture


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covs[k])`` (float64 tensors: [K], [K, d], [K, d, d])."""

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density at ``x`` ([B, d]); used by tests and plots."""
        comp = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        lp = comp.log_prob(x.to(F64)[:, None, :])
        return torch.logsumexp(lp + self.weights.log(), dim=1)

    def sample(self, seeds: Sequence[int]) -> torch.Tensor:
        """Exact samples, one per seed (per-sample streams: independent of batch size)."""
        u = sample_uniforms(seeds, (), stream="exact-component")
        k = torch.searchsorted(torch.cumsum(self.weights, 0), u, right=True)
        k = k.clamp(max=len(self.weights) - 1)
        z = sample_normals(seeds, (self.dim,), stream="exact-noise", dtype=F64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + (chol[k] @ z[:, :, None])[:, :, 0]


class MixtureDenoiser:
    """The exact ``eps`` of the noised mixture: ``eps(x, t) = -sqrt(1 - abar_t) * score(x, t)``.

    The noised marginal at ``t`` is ``sum_k pi_k N(sqrt(abar) mu_k, abar S_k + (1-abar) I)``; with
    ``S_k = U_k diag(l_k) U_k^T`` its covariance is ``U_k diag(abar l_k + 1 - abar) U_k^T``, so a
    step needs no matrix factorisation. Tensors are laid out ``[K, d, B]`` (samples last) so every
    operation runs over long contiguous rows.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        self.mixture, self.schedule = mixture, schedule
        lam, U = torch.linalg.eigh(mixture.covs)
        self._params = {"logw": mixture.weights.log(), "mu": mixture.means, "l": lam, "U": U,
                        "abar": schedule.abar}
        self._cache: dict = {}

    def _cast(self, dtype, device) -> dict:
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = {k: v.to(dtype=dtype, device=device)
                                for k, v in self._params.items()}
        return self._cache[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        p = self._cast(x.dtype, x.device)
        t = t.long().reshape(-1)
        abar = p["abar"][t[:1] if bool((t == t[0]).all()) else t]         # [1] or [B]
        var = abar * p["l"][:, :, None] + (1.0 - abar)                     # [K, d, B]
        diff = x.T[None] - abar.sqrt() * p["mu"][:, :, None]               # [K, d, B]
        y = _rotate(p["U"], diff, transpose=True)                          # U^T diff
        yv = y / var
        logits = -0.5 * ((y * yv).sum(1) + var.log().sum(1)) + p["logw"][:, None]
        resp = torch.softmax(logits, 0)                                    # [K, B]
        g = _rotate(p["U"], yv, transpose=False)                           # -score per comp.
        return ((1.0 - abar).sqrt() * (resp[:, None] * g).sum(0)).T


def _rotate(U: torch.Tensor, v: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``U_k^T v_k`` (or ``U_k v_k``) for ``v`` laid out ``[K, d, B]``; small d unrolled."""
    d = v.shape[1]
    if d > 8:
        return torch.einsum("kde,kdb->keb" if transpose else "ked,kdb->keb", U, v)
    cols = (U[:, j, :, None] if transpose else U[:, :, j, None] for j in range(d))
    return sum(c * v[:, j:j + 1] for j, c in enumerate(cols))


# ---------------------------------------------------------------------------- rewards


@dataclass(frozen=True)
class Reward:
    """``r(x) = -x.A x / 2 + b.x + c0``: linear (``A = 0``) or quadratic ``-(x-c).Q(x-c)/2``."""

    kind: str
    A: torch.Tensor
    b: torch.Tensor
    c0: float
    differentiable = True

    @classmethod
    def linear(cls, a: Sequence[float]) -> Reward:
        a = torch.as_tensor(a, dtype=F64)
        return cls("linear", torch.zeros(len(a), len(a), dtype=F64), a, 0.0)

    @classmethod
    def quadratic(cls, c: Sequence[float], Q) -> Reward:
        c, Q = torch.as_tensor(c, dtype=F64), torch.as_tensor(Q, dtype=F64)
        return cls("quadratic", Q, Q @ c, float(-0.5 * c @ Q @ c))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        A, b = self.A.to(x), self.b.to(x)
        return -0.5 * ((x @ A) * x).sum(-1) + x @ b + self.c0

    def expected(self, m: GaussianMixture) -> float:
        """``E[r(x)]`` under a mixture, in closed form."""
        quad = torch.einsum("kd,de,ke->k", m.means, self.A, m.means)
        quad = quad + torch.einsum("de,ked->k", self.A, m.covs)
        per = -0.5 * quad + m.means @ self.b + self.c0
        return float(m.weights @ per)


def tilt(
    m: GaussianMixture, rewards: Sequence[Reward], c: Sequence[float], alpha: float,
) -> tuple[GaussianMixture, float]:
    """``p(x) exp(sum_i c_i r_i(x) / alpha) / Z`` as a mixture, and ``log Z``.

    Per component: precision ``S^-1 + A/alpha``, mean ``S' (S^-1 mu + b/alpha)``, and
    ``log z_k = c0/alpha + (logdet S' - logdet S)/2 + (mu'.P' mu' - mu.S^-1 mu)/2``.
    """
    A = sum(ci * r.A for ci, r in zip(c, rewards, strict=True)) / alpha
    b = sum(ci * r.b for ci, r in zip(c, rewards, strict=True)) / alpha
    c0 = sum(ci * r.c0 for ci, r in zip(c, rewards, strict=True)) / alpha
    P = torch.linalg.inv(m.covs)
    P_new = P + A
    if not bool((torch.linalg.eigvalsh(P_new) > 1e-12).all()):
        raise SpecError(f"the tilt with coefficients {list(c)} (alpha={alpha}) is not "
                        "normalisable: a quadratic reward with negative weight grows faster "
                        "than the base decays")
    S_new = torch.linalg.inv(P_new)
    h = (P @ m.means[:, :, None])[:, :, 0] + b
    mu_new = (S_new @ h[:, :, None])[:, :, 0]
    log_z = c0 + 0.5 * (torch.logdet(S_new) - torch.logdet(m.covs)) + 0.5 * (
        (mu_new * h).sum(-1) - torch.einsum("kd,kde,ke->k", m.means, P, m.means))
    logw = m.weights.log() + log_z
    log_Z = torch.logsumexp(logw, 0)
    S_new = 0.5 * (S_new + S_new.transpose(1, 2))
    tilted = GaussianMixture(torch.exp(logw - log_Z), mu_new, S_new)
    if not all(bool(t.isfinite().all()) for t in (tilted.weights, mu_new, S_new, log_Z)):
        raise SpecError(f"the tilt with coefficients {list(c)} (alpha={alpha}) overflows "
                        "(NaN or infinite parameters); use smaller reward coefficients or a "
                        "larger alpha")
    return tilted, float(log_Z)


# ---------------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class Toy2dProblem:
    """A base mixture, basis rewards, the reference KL strength ``alpha`` and a noise schedule."""

    mixture: GaussianMixture
    rewards: tuple[Reward, ...]
    alpha: float
    schedule: Schedule
    spec: dict

    @property
    def k(self) -> int:
        return len(self.rewards)

    def tilted(self, c: Sequence[float]) -> tuple[GaussianMixture, float]:
        """The mixture tilted by ``sum_i c_i r_i`` at ``alpha``, and its ``log Z``."""
        return tilt(self.mixture, self.rewards, c, self.alpha)

    def target(self, pref: Preference) -> tuple[GaussianMixture, float]:
        """The exact target of ``(w, lam)``: the base tilted by ``lam * r_w``."""
        pref.check_k(self.k)
        return self.tilted([pref.lam * wi for wi in pref.w])

    def expected_rewards(self, m: GaussianMixture) -> list[float]:
        return [r.expected(m) for r in self.rewards]

    def rewards_of(self, x: torch.Tensor) -> torch.Tensor:
        """Each basis reward of each sample: ``[B, K]``."""
        return torch.stack([r(x) for r in self.rewards], dim=1)

    def denoiser(self, m: GaussianMixture) -> MixtureDenoiser:
        return MixtureDenoiser(m, self.schedule)

    def base_denoiser(self) -> MixtureDenoiser:
        return self.denoiser(self.mixture)

    def with_alpha(self, alpha: float) -> Toy2dProblem:
        """The same problem at another KL strength (fine-tuned experts carry their own)."""
        return dataclasses.replace(self, alpha=float(alpha), spec=self.spec | {"alpha": alpha})

    def expert_denoiser(self, i: int) -> MixtureDenoiser:
        """Exact expert ``i``: the exact denoiser of the base tilted by ``r_i`` at ``alpha``."""
        return self.denoiser(self.tilted([1.0 if j == i else 0.0 for j in range(self.k)])[0])


PRESETS: dict[str, dict] = {
    "bimodal": {
        "mixture": {"weights": [0.5, 0.5], "means": [[-2, 0], [2, 0]],
                    "covs": [[[0.3, 0], [0, 0.3]], [[0.3, 0], [0, 0.3]]]},
        "rewards": [{"type": "linear", "a": [1, 0]},
                    {"type": "quadratic", "c": [0, 1], "Q": [[1, 0], [0, 1]]}],
        "alpha": 1.0,
        "schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02},
    },
    "bimodal-linear": {
        "mixture": {"weights": [0.5, 0.5], "means": [[-2, 0], [2, 0]],
                    "covs": [[[0.3, 0], [0, 0.3]], [[0.3, 0], [0, 0.3]]]},
        "rewards": [{"type": "linear", "a": [1, 0]}, {"type": "linear", "a": [0, 1]}],
        "alpha": 1.0,
        "schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02},
    },
    "gaussian": {
        "mixture": {"weights": [1.0], "means": [[0.5, -0.5]],
                    "covs": [[[1.0, 0.3], [0.3, 0.5]]]},
        "rewards": [{"type": "linear", "a": [1, 0]}, {"type": "linear", "a": [-0.5, 1]}],
        "alpha": 1.0,
        "schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02},
    },
    "trimodal-3d": {
        "mixture": {"weights": [0.3, 0.3, 0.4],
                    "means": [[-2, 0, 0], [2, 0, 1], [0, 2, -1]],
                    "covs": [[[0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3]],
                             [[0.5, 0.1, 0], [0.1, 0.3, 0], [0, 0, 0.2]],
                             [[0.2, 0, 0], [0, 0.4, 0], [0, 0, 0.3]]]},
        "rewards": [{"type": "linear", "a": [1, 0, 0]},
                    {"type": "quadratic", "c": [0, 1, 0], "Q": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
                    {"type": "linear", "a": [0, 0, 1]}],
        "alpha": 1.0,
        "schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02},
    },
}


def load_problem(spec: str | Path | dict = "bimodal") -> Toy2dProblem:
    """A problem from a preset name, a JSON file path, or an already-parsed spec dict."""
    if isinstance(spec, dict):
        return parse_spec(spec)
    if str(spec) in PRESETS:
        return parse_spec(copy.deepcopy(PRESETS[str(spec)]))
    path = Path(spec)
    if not path.is_file():
        raise SpecError(f"spec {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) "
                        "nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise SpecError(f"spec file {path} is not valid JSON: {e}") from None
    return parse_spec(data)


def _fields(obj, name: str, required: set[str], optional: frozenset = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise SpecError(f"spec field {name!r} must be an object, got {type(obj).__name__}")
    missing, unknown = required - obj.keys(), obj.keys() - required - optional
    if missing:
        raise SpecError(f"spec field {name!r} is missing {sorted(missing)}")
    if unknown:
        raise SpecError(f"spec field {name!r} has unknown {sorted(unknown)}; "
                        f"allowed: {sorted(required | optional)}")


def _tensor(v, name: str, shape: tuple) -> torch.Tensor:
    try:
        t = torch.as_tensor(v, dtype=F64)
    except (TypeError, ValueError):
        raise SpecError(f"spec field {name!r} must be numbers of shape {list(shape)}, "
                        f"got {v!r}") from None
    if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
        raise SpecError(f"spec field {name!r} must be finite numbers of shape {list(shape)}, "
                        f"got shape {list(t.shape)}")
    return t


def parse_spec(spec: dict) -> Toy2dProblem:
    """Validate a spec (see ``PRESETS`` for the format) and build the problem."""
    _fields(spec, "spec", {"mixture", "rewards", "alpha", "schedule"})
    mixture = _parse_mixture(spec["mixture"])
    d = mixture.dim
    if not isinstance(spec["rewards"], list) or not spec["rewards"]:
        raise SpecError("spec field 'rewards' must be a non-empty list")
    rewards = tuple(_parse_reward(r, i, d) for i, r in enumerate(spec["rewards"]))
    alpha = spec["alpha"]
    if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise SpecError(f"spec field 'alpha'={alpha!r} must be a number > 0")
    sch = spec["schedule"]
    _fields(sch, "schedule", {"T", "beta_start", "beta_end"})
    if not isinstance(sch["T"], int) or isinstance(sch["T"], bool):
        raise SpecError(f"spec field 'schedule.T'={sch['T']!r} must be an integer >= 1")
    for key in ("beta_start", "beta_end"):
        v = sch[key]
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise SpecError(f"spec field 'schedule.{key}'={v!r} must be a finite number")
    try:
        schedule = Schedule.linear(sch["T"], float(sch["beta_start"]), float(sch["beta_end"]))
    except (TypeError, ValueError, UsageError) as e:
        raise SpecError(f"spec field 'schedule': {e}") from None
    problem = Toy2dProblem(mixture, rewards, float(alpha), schedule, spec)
    for i in range(problem.k):   # every expert must exist
        problem.tilted([1.0 if j == i else 0.0 for j in range(problem.k)])
    return problem


def _parse_mixture(mix) -> GaussianMixture:
    _fields(mix, "mixture", {"weights", "means", "covs"})
    if not isinstance(mix["means"], list) or not mix["means"] or not isinstance(
            mix["means"][0], list):
        raise SpecError("spec field 'mixture.means' must be a non-empty list of points")
    K, d = len(mix["means"]), len(mix["means"][0])
    w = _tensor(mix["weights"], "mixture.weights", (K,))
    means = _tensor(mix["means"], "mixture.means", (K, d))
    covs = _tensor(mix["covs"], "mixture.covs", (K, d, d))
    if bool((w <= 0).any()) or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-6):
        raise SpecError(f"spec field 'mixture.weights'={w.tolist()} must be > 0 and sum to 1 "
                        f"(they sum to {float(w.sum()):g})")
    for k in range(K):
        sym = torch.allclose(covs[k], covs[k].T, atol=1e-9)
        if not sym or float(torch.linalg.eigvalsh(covs[k]).min()) <= 0:
            raise SpecError(f"spec field 'mixture.covs[{k}]'={covs[k].tolist()} must be "
                            "symmetric positive definite")
    return GaussianMixture(w / w.sum(), means, covs)


def _parse_reward(r, i: int, d: int) -> Reward:
    name = f"rewards[{i}]"
    kind = r.get("type") if isinstance(r, dict) else None
    if kind == "linear":
        _fields(r, name, {"type", "a"})
        return Reward.linear(_tensor(r["a"], f"{name}.a", (d,)))
    if kind == "quadratic":
        _fields(r, name, {"type", "c", "Q"})
        Q = _tensor(r["Q"], f"{name}.Q", (d, d))
        if not torch.allclose(Q, Q.T, atol=1e-9):
            raise SpecError(f"spec field '{name}.Q'={Q.tolist()} must be symmetric")
        return Reward.quadratic(_tensor(r["c"], f"{name}.c", (d,)), Q)
    raise SpecError(f"spec field '{name}.type'={kind!r} is not known; use 'linear' or 'quadratic'")


# ---------------------------------------------------------------------------- the domain


def mixture_soup(base: GaussianMixture, experts: Sequence[GaussianMixture],
                 coefs: Sequence[float]) -> GaussianMixture:
    """Soup of exact experts: ``theta_0 + sum_i c_i (theta_i - theta_0)`` over the mixture's
    log-weights (renormalised), means and covariances."""
    def mix(get: Callable) -> torch.Tensor:
        out = get(base)
        return out + sum(c * (get(e) - get(base)) for c, e in zip(coefs, experts, strict=True))

    covs = mix(lambda m: m.covs)
    if bool((torch.linalg.eigvalsh(covs) <= 0).any()):
        raise UsageError(f"soup coefficients {list(coefs)} give a covariance that is not "
                         "positive definite; use smaller lam")
    return GaussianMixture(torch.softmax(mix(lambda m: m.weights.log()), 0),
                           mix(lambda m: m.means), covs)


@dataclass
class TrainedExpert:
    """A fine-tuned toy2d model: its denoiser, the reward weights and alpha it was trained for."""

    denoiser: Denoiser
    w: list[float]
    alpha: float
    path: Path


class Toy2dDomain:
    """toy2d as a ``Domain``: the exact experts (or fine-tuned ones, ``trained``); MORL is the
    exact denoiser of the tilted target (the oracle a fine-tune converges to); the soup
    interpolates the exact experts' mixture parameters.

    Expert ``i`` fine-tuned for reward weights ``W_i`` makes the blend's basis reward
    ``r_i = W_i . r``, so the target of ``(w, lam)`` is the base tilted by ``lam * w @ W``.
    """

    name, differentiable = "toy2d", True

    def __init__(self, problem: Toy2dProblem | str | dict = "bimodal", steps: int | None = None,
                 trained: Sequence[TrainedExpert] = ()):
        problem = problem if isinstance(problem, Toy2dProblem) else load_problem(problem)
        self.problem, self.basis = _with_trained(problem, list(trained))
        self.trained = list(trained)
        self.schedule, self.steps = problem.schedule, steps or problem.schedule.T
        self.shape = (problem.mixture.dim,)
        self.base = problem.base_denoiser()
        self.tilted = [self.problem.tilted(row)[0] for row in self.basis.tolist()]
        self.experts = ([e.denoiser for e in self.trained] if trained else
                        [self.problem.denoiser(m) for m in self.tilted])
        self.reward_names = [f"r{i + 1}" for i in range(len(self.experts))]
        self.alpha = self.problem.alpha

    def cond(self, seeds: list[int]) -> dict:
        return {}

    def strata(self, seeds: list[int]) -> None:
        return None

    def rewards(self, x0: torch.Tensor, **_) -> torch.Tensor:
        r = self.problem.rewards_of(x0.double())
        return r @ self.basis.T if self.trained else r

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def blend(self, pref: Preference) -> Denoiser:
        return BlendedDenoiser(self.base, self.experts, pref)

    def soup(self, coefs: list[float]) -> Denoiser:
        if self.trained:
            raise UsageError("the soup of fine-tuned toy2d experts is not defined here; "
                             "use the exact experts (no --experts)")
        return self.problem.denoiser(mixture_soup(self.problem.mixture, self.tilted, coefs))

    def coefficients(self, pref: Preference) -> list[float]:
        """The tilt of ``pref`` on the problem's rewards: ``lam * w @ W``."""
        pref.check_k(len(self.experts))
        return (pref.lam * torch.tensor(pref.w, dtype=F64) @ self.basis).tolist()

    def mixture(self, pref: Preference) -> tuple[GaussianMixture, float]:
        """The exact target of ``pref`` as a mixture, and its ``log Z``."""
        return self.problem.tilted(self.coefficients(pref))

    def morl(self, pref: Preference) -> Denoiser:
        return self.problem.denoiser(self.mixture(pref)[0])

    def amortised(self, pref: Preference) -> None:
        return None

    def conditioned(self, pref: Preference) -> None:
        return None

    def target(self, pref: Preference) -> ExactTarget:
        target, log_z = self.mixture(pref)
        means = torch.tensor(self.problem.expected_rewards(target), dtype=F64)
        means = means @ self.basis.T if self.trained else means
        return ExactTarget(lambda seeds: target.sample(seeds).float(), means.tolist(), log_z)

    def params(self, parts: list[str]) -> int:
        """Mixture parameters (weights, means, covariances) of each distinct model held."""
        k, d = len(self.problem.mixture.weights), self.problem.mixture.dim
        held = 1 if "soup" in parts else len(parts)
        return held * (k + k * d + k * d * d)


def _with_trained(problem: Toy2dProblem, trained: list[TrainedExpert]):
    """The problem at the experts' alpha, and the basis ``W`` (one row of reward weights per
    expert; the identity for the exact experts)."""
    if not trained:
        return problem, torch.eye(problem.k, dtype=F64)
    alphas = {e.alpha for e in trained}
    if len(alphas) != 1:
        raise UsageError(f"--experts were trained at different alphas {sorted(alphas)}; "
                         "blend experts trained at one alpha")
    return problem.with_alpha(alphas.pop()), torch.tensor([e.w for e in trained], dtype=F64)
