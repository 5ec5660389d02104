"""Amortised blend: one preference-conditioned adapter that serves any ``(w, lam)`` with one
network evaluation per step.

The network is the base with one LoRA adapter plus a small MLP of the coefficients
``(lam * w_1, ..., lam * w_K, lam)`` whose output is added to the time embedding (a forward
hook on the time-embedding module). It is trained by regressing its prediction onto the
blended prediction ``c_pre eps_pre + sum_i c_i eps_i`` at states visited by blended
trajectories, for preferences drawn over the simplex and a range of ``lam``. Both the LoRA's
``B`` and the MLP's last layer start at zero, so training starts from the pretrained model.
For sampling, the LoRA is merged into a plain copy of the network: one model's cost per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffusion_blend.blend import Denoiser, Preference
from diffusion_blend.errors import UsageError


def coefficients(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per-row conditioning features ``[lam * w, lam]`` (``w``: [B, K], ``lam``: [B])."""
    return torch.cat([lam[:, None] * w, lam[:, None]], 1)


class PrefEmbedding(nn.Module):
    """MLP of the preference features, added to the output of ``module`` (the time embedding)
    while ``current`` is set; its last layer starts at zero (no change to the model)."""

    def __init__(self, k: int, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.k, self.current = k, None

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.current is None:
            return out
        return out + self.net(self.current.to(out.dtype)).to(out.dtype)


def per_row_blend(base: Denoiser, experts: Sequence[Denoiser], x: torch.Tensor,
                  t: torch.Tensor, cond: dict, feats: torch.Tensor) -> torch.Tensor:
    """The blend with each row's own coefficients (``feats`` from ``coefficients``)."""
    c = feats[:, :-1]
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = (1.0 - c.sum(1)).reshape(shape) * base(x, t, **cond)
    for i, e in enumerate(experts):
        out = out + c[:, i].reshape(shape) * e(x, t, **cond)
    return out


class AmortisedDenoiser(nn.Module):
    """``denoiser(x, t, **cond)`` of the amortised network at a preference (1 NFE per step)."""

    def __init__(self, network: nn.Module, embedding: PrefEmbedding, module: nn.Module,
                 preference: Preference, lam_max: float = float("inf"),
                 allow_extrapolation: bool = False):
        super().__init__()
        self.network, self.embedding = network, embedding
        self._handle = embedding.attach(module)
        self.lam_max, self.allow = lam_max, allow_extrapolation
        self.preference = preference

    @property
    def preference(self) -> Preference:
        return self._preference

    @preference.setter
    def preference(self, pref: Preference) -> None:
        """Refuse a preference outside the training range (w on the simplex, lam in
        ``[0, lam_max]``) unless extrapolation is allowed: the adapter never saw it."""
        pref.check_k(self.embedding.k)
        outside = pref.lam > self.lam_max or min(pref.w) < 0 or abs(sum(pref.w) - 1) > 1e-6
        if outside and not self.allow:
            raise UsageError(f"the amortised adapter was trained on w on the simplex and "
                             f"0 <= lam <= {self.lam_max:g}; w={list(pref.w)}, lam={pref.lam} "
                             "is outside (allow extrapolation to use it anyway)")
        self._preference = pref

    @property
    def nfe(self) -> float:
        return 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        w = torch.tensor(self.preference.w, dtype=torch.float32).expand(x.shape[0], -1)
        lam = torch.full((x.shape[0],), float(self.preference.lam))
        self.embedding.current = coefficients(w, lam).to(x.device)
        try:
            return self.network(x, t, **cond)
        finally:
            self.embedding.current = None


def sample_preferences(gen: torch.Generator, n: int, k: int, lam_max: float,
                       vertex_share: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` uniform on the simplex (a share of them at the vertices) and ``lam`` uniform on
    ``[0, lam_max]``."""
    w = -torch.log(torch.rand(n, k, generator=gen))
    w = w / w.sum(1, keepdim=True)
    vertex = torch.rand(n, generator=gen) < vertex_share
    idx = torch.randint(0, k, (n,), generator=gen)
    w[vertex] = nn.functional.one_hot(idx[vertex], k).float()
    return w, torch.rand(n, generator=gen) * lam_max
