"""Amortised blend: one preference-conditioned adapter that serves any ``(w, lam)`` with one
network evaluation per step.

The network is the base with one LoRA adapter plus a small MLP of the coefficients
``(lam * w_1, ..., lam * w_K, lam)`` whose output is added to the time embedding (a forward
hook on the time-embedding module). It is trained by regressing its prediction onto the
blended prediction ``c_pre eps_pre + sum_i c_i eps_i`` at states visited by blended
trajectories, for preferences drawn over the simplex and a range of ``lam``. Both the LoRA's
``B`` and the MLP's last layer start at zero, so training starts from the pretrained model.
For sampling on digits, the LoRA is merged into a plain copy of the network; in a pipeline
(``AmortisedModel``) it runs as the active adapter: one model's cost per step either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffusion_blend.adapters import (
    adapter_names,
    adapter_state,
    add_lora,
    base_sha256,
    load_adapter_state,
    use_adapter,
)
from diffusion_blend.blend import Denoiser, Preference
from diffusion_blend.errors import UsageError
from diffusion_blend.io import load_weights


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


class OneNetwork(nn.Module):
    """What both one-network forms share: the preference, refused outside the training range
    unless extrapolation is allowed, and one network evaluation per call."""

    def __init__(self, embedding: PrefEmbedding, preference: Preference, lam_max: float,
                 allow_extrapolation: bool):
        super().__init__()
        self.embedding, self.lam_max, self.allow = embedding, lam_max, allow_extrapolation
        self.preference = preference

    @property
    def preference(self) -> Preference:
        return self._preference

    @preference.setter
    def preference(self, pref: Preference) -> None:
        self._preference = in_range(pref, self.embedding.k, self.lam_max, self.allow)

    @property
    def nfe(self) -> float:
        return 1.0


class AmortisedDenoiser(OneNetwork):
    """``denoiser(x, t, **cond)`` of the amortised network at a preference (1 NFE per step)."""

    def __init__(self, network: nn.Module, embedding: PrefEmbedding, module: nn.Module,
                 preference: Preference, lam_max: float = float("inf"),
                 allow_extrapolation: bool = False):
        super().__init__(embedding, preference, lam_max, allow_extrapolation)
        self.network = network
        self._handle = embedding.attach(module)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.embedding.current = pref_features(self.preference).to(x.device)
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


def in_range(pref: Preference, k: int, lam_max: float, allow: bool) -> Preference:
    """``pref``, refused when outside the training range (w on the simplex, lam in ``[0,
    lam_max]``) unless extrapolation is allowed: the adapter never saw it."""
    pref.check_k(k)
    outside = pref.lam > lam_max or min(pref.w) < 0 or abs(sum(pref.w) - 1) > 1e-6
    if outside and not allow:
        raise UsageError(f"the amortised adapter was trained on w on the simplex and "
                         f"0 <= lam <= {lam_max:g}; w={list(pref.w)}, lam={pref.lam} "
                         "is outside (allow extrapolation to use it anyway)")
    return pref


def time_embedding_of(model: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is the timestep embedding every block reads (a UNet's
    ``time_embedding``, a DiT's ``time_text_embed``) and its width."""
    for attr in ("time_embedding", "time_text_embed"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            return module, linears[-1].out_features
    raise UsageError(f"{type(model).__name__} has no time_embedding / time_text_embed to "
                     "condition on the preference")


def pref_features(pref: Preference) -> torch.Tensor:
    """The embedding's input for one preference, ``[1, K + 1]`` (broadcast over the batch)."""
    w = torch.tensor(pref.w, dtype=torch.float32)[None]
    return coefficients(w, torch.tensor([float(pref.lam)]))


class AmortisedModel(OneNetwork):
    """A pipeline's denoiser (``pipe.unet`` / ``pipe.transformer``) with the amortised adapter
    active and the preference added to its time embedding: its own forward, whatever it
    predicts (eps, v or flow), at one network evaluation per call."""

    def __init__(self, model: nn.Module, adapter: str, embedding: PrefEmbedding,
                 preference: Preference, lam_max: float, allow_extrapolation: bool = False):
        super().__init__(embedding, preference, lam_max, allow_extrapolation)
        self.model, self.adapter = [model], adapter    # a list: not a submodule

    def forward(self, *args, **kwargs):
        model = self.model[0]
        self.embedding.current = pref_features(self.preference).to(
            next(model.parameters()).device)
        try:
            with use_adapter(model, self.adapter):
                return type(model).forward(model, *args, **kwargs)
        finally:
            self.embedding.current = None


AMORTISED_ADAPTER = "amortised"
AMORTISED_FILE = "amortised.safetensors"
RECIPE = "dblend distill sd"


def amortised_state(model: nn.Module, embedding: PrefEmbedding) -> dict[str, torch.Tensor]:
    """What ``dblend distill sd`` saves: the adapter (``lora.*``) and the embedding
    (``pref.*``)."""
    state = {f"lora.{k}": v for k, v in adapter_state(model, AMORTISED_ADAPTER).items()}
    return state | {f"pref.{k}": v.detach().contiguous() for k, v in
                    embedding.state_dict().items()}


def attach_amortised(model: nn.Module, directory: str | Path) -> tuple[PrefEmbedding, dict]:
    """Load ``DIRECTORY/amortised.safetensors`` onto ``model`` (a pipeline's denoiser): the
    adapter, and the embedding hooked on its time embedding; refused on another base. Loaded
    once per model: attaching the same directory again returns what is there."""
    attached = getattr(model, "_dblend_amortised", None)
    if attached is not None and attached[0] == str(directory):
        return attached[1]
    if AMORTISED_ADAPTER in adapter_names(model):
        raise UsageError(f"{type(model).__name__} already holds an amortised adapter "
                         f"(not from {directory})")
    state, meta = _load(Path(directory) / AMORTISED_FILE)
    if meta.get("base_sha256") != base_sha256(model):
        raise UsageError(f"{directory}: the amortised adapter was distilled on another base "
                         f"({meta.get('model')}); distil it for this model with `{RECIPE}`")
    add_lora(model, AMORTISED_ADAPTER, meta["lora"]["rank"], meta["lora"]["targets"])
    load_adapter_state(model, AMORTISED_ADAPTER, _part(state, "lora."))
    module, dim = time_embedding_of(model)
    emb = PrefEmbedding(len(meta["experts"]), dim, meta["config"]["hidden"])
    emb.load_state_dict(_part(state, "pref."))
    emb.to(next(model.parameters()).device).requires_grad_(False).attach(module)
    model.requires_grad_(False)
    model._dblend_amortised = (str(directory), (emb, meta))
    return emb, meta


def _load(path: Path) -> tuple[dict, dict]:
    if not path.parent.is_dir():
        raise UsageError(f"--amortised {path.parent}: no such directory (make one with "
                         f"`{RECIPE}`)")
    return load_weights(path, RECIPE)


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
