"""The blend as a drop-in denoiser for any diffusers pipeline (``pipe.unet`` or
``pipe.transformer``), so the pipeline's own ``__call__``, scheduler, classifier-free guidance,
callbacks and output types stay untouched.

``BlendedModel`` returns ``c_pre * pred_pre + sum_i c_i * pred_i`` (``c = lam * w``,
``c_pre = 1 - lam * sum(w)``): the coefficients sum to one, so the blend is affine in the
prediction. Hence it works for eps-, v- and flow-prediction models alike, and it commutes with
classifier-free guidance: guiding the blend, ``u + s (c - u)`` of blended predictions, equals
blending the guided predictions of each model.

LoRA experts (adapter names on the one base module) are evaluated in **one** forward: the batch
is repeated once per blend term and each block of rows is routed to its adapter (PEFT's mixed
batch forward), so the base weights are held once. Full fine-tuned modules are also accepted
(the paper's setting): then each model runs separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import is_dataclass, replace

import torch
from torch import nn

from diffusion_blend.adapters import BASE, lora_layers, soup_adapters
from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.errors import UsageError


@contextmanager
def route_rows(model: nn.Module, names: Sequence[str]):
    """During a forward of ``model``, row ``j`` of every LoRA layer's input uses adapter
    ``names[j]`` (``BASE``: none). PEFT checks each layer sees ``len(names)`` rows."""
    names = list(names)

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    layers = lora_layers(model)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    disabled = [(layer, layer.disable_adapters) for layer in layers]
    try:
        for layer, _ in disabled:
            layer.enable_adapters(True)
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer, was in disabled:
            layer.enable_adapters(not was)


def _batch_of(args: tuple, kwargs: dict) -> int:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    raise UsageError("the denoiser was called without a batched tensor input")


def repeat_batch(v, b: int, n: int):
    """Repeat every tensor whose first dimension is the batch ``n`` times (through dicts,
    lists and tuples); anything else (scalar timesteps, flags) passes through."""
    if isinstance(v, torch.Tensor):
        return v.repeat(n, *([1] * (v.ndim - 1))) if v.ndim > 0 and v.shape[0] == b else v
    if isinstance(v, dict):
        return {k: repeat_batch(x, b, n) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(repeat_batch(x, b, n) for x in v)
    return v


def _prediction(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _like(out, pred: torch.Tensor):
    """``pred`` in the container the wrapped model returned (tensor, tuple or output class)."""
    if isinstance(out, torch.Tensor):
        return pred
    if isinstance(out, tuple):
        return (pred, *out[1:])
    if is_dataclass(out) and not hasattr(out, "keys"):
        return replace(out, sample=pred)
    return out.__class__(**{**out, "sample": pred})   # diffusers' BaseOutput


class BlendedModel(nn.Module):
    """A pipeline denoiser returning the blend of a base and K experts (see module docstring).

    ``experts``: adapter names loaded on ``base`` (one batched forward), or full modules with
    the same call signature as ``base``. Attributes the pipeline reads (``config``, ``dtype``,
    ``device``, ...) come from ``base``. Set ``preference`` between calls to move along the
    trade-off without reloading anything.
    """

    def __init__(self, base: nn.Module, experts: Sequence[str | nn.Module],
                 preference: Preference):
        super().__init__()
        if not experts:
            raise UsageError("blend: give at least one expert (adapter name or module)")
        self.base = base
        self.expert_modules = nn.ModuleList([e for e in experts if isinstance(e, nn.Module)])
        self.adapters = [e for e in experts if isinstance(e, str)]
        if self.adapters and len(self.expert_modules):
            raise UsageError("blend: experts must be all adapter names or all modules")
        self._check_adapters()
        self.k = len(experts)
        # the term algebra (coefficients, which terms run) is the core blend's, over keys:
        # ``BASE`` and adapter names, or the modules themselves
        self.blend = BlendedDenoiser(BASE if self.adapters else base,
                                     self.adapters or list(self.expert_modules), preference)

    def _check_adapters(self) -> None:
        known = {n for layer in lora_layers(self.base) for n in layer.lora_A}
        missing = [a for a in self.adapters if a not in known]
        if missing:
            raise UsageError(f"adapters {missing} are not loaded on the base model; loaded: "
                             f"{sorted(known) or 'none'}")

    @property
    def preference(self) -> Preference:
        return self.blend.preference

    @preference.setter
    def preference(self, pref: Preference) -> None:
        self.blend.preference = pref

    def terms(self) -> list[tuple[float, str | nn.Module]]:
        """``(coefficient, model)`` of every non-zero term (base: ``BASE`` or ``self.base``)."""
        return self.blend.terms()

    @property
    def nfe(self) -> float:
        """Network evaluations per step per sample (the batched forward counts each term)."""
        return float(len(self.terms()))

    def forward(self, *args, **kwargs):
        terms = self.terms()
        if len(terms) == 1 and terms[0][0] == 1.0:   # lam = 0 or w = e_i: that model exactly
            return self._single(terms[0][1], args, kwargs)
        if self.adapters:
            out, preds = self._batched(terms, args, kwargs)
        else:
            outs = [m(*args, **kwargs) for _, m in terms]
            out, preds = outs[0], [_prediction(o) for o in outs]
        blend = sum(c * p.float() for (c, _), p in zip(terms, preds, strict=True))
        return _like(out, blend.to(preds[0].dtype))

    def _single(self, model, args: tuple, kwargs: dict):
        """One model's own forward (the same code path as running it alone: bit-identical)."""
        if isinstance(model, nn.Module):
            return model(*args, **kwargs)
        with soup_adapters(self.base, [] if model == BASE else [(model, 1.0)]):
            return self.base(*args, **kwargs)

    def _batched(self, terms, args: tuple, kwargs: dict):
        b, n = _batch_of(args, kwargs), len(terms)
        names = [name for _, name in terms for _ in range(b)]
        with route_rows(self.base, names):
            out = self.base(*repeat_batch(args, b, n), **repeat_batch(kwargs, b, n))
        return out, list(_prediction(out).split(b))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)


def denoiser_attr(pipe) -> str:
    """``"unet"`` or ``"transformer"``: where the pipeline keeps its denoiser."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise UsageError(f"{type(pipe).__name__} has neither a unet nor a transformer to blend")


def blend_pipeline(pipe, experts: Sequence[str | nn.Module], preference: Preference):
    """Replace ``pipe``'s denoiser by a ``BlendedModel`` (adapters already loaded on it, e.g. with
    ``pipe.load_lora_weights(path, adapter_name=...)``); returns the ``BlendedModel``. Change
    ``model.preference`` between calls; ``unblend_pipeline`` restores the original."""
    attr = denoiser_attr(pipe)
    current = getattr(pipe, attr)
    base = current.base if isinstance(current, BlendedModel) else current
    model = BlendedModel(base, experts, preference)
    setattr(pipe, attr, model)
    return model


def unblend_pipeline(pipe) -> None:
    attr = denoiser_attr(pipe)
    current = getattr(pipe, attr)
    if isinstance(current, BlendedModel):
        setattr(pipe, attr, current.base)
