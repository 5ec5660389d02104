"""LoRA experts on one base network, through PEFT, for any ``nn.Module`` denoiser.

Several named adapters live on the same base weights; ``use_adapter`` picks the active one and
``adapter_view`` gives a denoiser that runs the base with one adapter (or none, the pretrained
model) without copying any weight.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from diffusion_blend.errors import UsageError

BASE = "__base__"


def lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def add_lora(model: nn.Module, name: str, rank: int = 4, targets: Sequence[str] = (),
             alpha: float | None = None, seed: int | None = None) -> nn.Module:
    """Inject a LoRA adapter ``name`` (B initialised at zero: the model is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                     init_lora_weights=True)
    if name in getattr(model, "peft_config", {}):
        raise UsageError(f"the model already has an adapter named {name!r}")
    # PEFT's one-shot injector treats a model that already has a config dict as a mistake (and
    # warns); each injection gets a fresh dict, then the adapters' configs are merged.
    existing = model.__dict__.pop("peft_config", None)
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            inject_adapter_in_model(cfg, model, adapter_name=name)
        except ValueError as e:
            raise UsageError(f"LoRA targets {list(targets)} do not fit the model: {e}") from None
        finally:
            if existing is not None:
                model.peft_config = existing | getattr(model, "peft_config", {})
    for n, p in model.named_parameters():
        p.requires_grad_(f".{name}." in n)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in lora_layers(model):
        for n in layer.lora_A:
            if n not in names:
                names.append(n)
    return names


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _restore_requires_grad(model: nn.Module, grads: dict[str, bool]) -> None:
    """``set_adapter`` flips ``requires_grad``; training code relies on it staying as set."""
    for n, p in model.named_parameters():
        p.requires_grad_(grads[n])


def use_adapter(model: nn.Module, name: str | None) -> AbstractContextManager[nn.Module]:
    """Run ``model`` with only adapter ``name`` active (``None``: the base model alone)."""
    return soup_adapters(model, [] if name is None else [(name, 1.0)])


@contextmanager
def soup_adapters(model: nn.Module, terms: Sequence[tuple[str, float]]) -> Iterator[nn.Module]:
    """Run ``model`` with the adapters of ``terms`` active at once, adapter ``name`` scaled by
    ``c``: every LoRA layer computes ``W0 x + sum c * scaling * B A x`` (PEFT's multi-adapter
    forward). No terms: the base model alone."""
    layers = lora_layers(model)
    rescale = any(c != 1.0 for _, c in terms)   # a plain adapter switch leaves scales alone
    saved = [(layer, layer.active_adapters, layer.disable_adapters,
              dict(layer.scaling) if rescale else None) for layer in layers]
    grads = _requires_grad(model)
    try:
        for layer in layers:
            layer.enable_adapters(bool(terms))
            if terms:
                layer.set_adapter([n for n, _ in terms])
                for n, c in terms if rescale else ():
                    layer.scaling[n] = layer.scaling[n] * c
        yield model
    finally:
        for layer, active, disabled, scaling in saved:
            if scaling is not None:
                layer.scaling.update(scaling)
            layer.enable_adapters(not disabled)
            layer.set_adapter(active)
        _restore_requires_grad(model, grads)


@contextmanager
def unit_scales(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run with adapters ``names`` at their trained scale (``lora_alpha / r``), whatever
    ``set_adapters(..., adapter_weights=...)`` left there; the scales are restored after."""
    layers = lora_layers(model) if names else []
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    try:
        for layer in layers:
            for n in names:
                layer.set_scale(n, 1.0)
        yield model
    finally:
        for layer, scaling in saved:
            layer.scaling.update(scaling)


def dora_adapters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Which of ``names`` are DoRA adapters (PEFT cannot route them by rows)."""
    layers = lora_layers(model)
    return [n for n in names if any(layer.use_dora.get(n, False) for layer in layers)]


def fused(model: nn.Module) -> bool:
    """Whether adapter weights are merged into the base weights (``pipe.fuse_lora()``)."""
    return any(layer.merged for layer in lora_layers(model))


@contextmanager
def route_rows(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """During a forward of ``model``, row ``j`` of every LoRA layer's input uses adapter
    ``names[j]`` (``BASE``: none): PEFT's mixed-batch forward. The routed adapters are the
    active ones meanwhile, so a LoRA scale diffusers applies (``cross_attention_kwargs``)
    scales each of them."""
    names = list(names)
    routed = sorted({n for n in names if n != BASE})

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    layers = lora_layers(model)
    saved = [(layer, layer.disable_adapters, layer.active_adapters) for layer in layers]
    grads = _requires_grad(model)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(True)
            if routed:
                layer.set_adapter(routed)
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer, disabled, active in saved:
            layer.enable_adapters(not disabled)
            layer.set_adapter(active)
        _restore_requires_grad(model, grads)


class AdapterView(nn.Module):
    """A denoiser view of ``model`` with one adapter active (``None``: the pretrained model)."""

    def __init__(self, model: nn.Module, name: str | None):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with use_adapter(self.model, self.name):
            return self.model(x, t, **cond)


def merged_copy(model: nn.Module, adapter: str | None = None,
                soup: Sequence[tuple[str, float]] = ()) -> nn.Module:
    """A plain copy of ``model`` with LoRA ``adapter`` merged into its weights at its trained
    scale (``None``: the base weights), or the weight soup ``W0 + sum c * dW`` of ``soup``'s
    ``(adapter, c)``, and every LoRA wrapper removed: that model at the cost of one without
    adapters (``soup = [(a, 1.0)]`` is bit for bit ``adapter = a``)."""
    terms = [(adapter, 1.0)] if adapter is not None else [(n, c) for n, c in soup if c != 0.0]
    out = copy.deepcopy(model)
    layers = lora_layers(out)
    for layer in layers:
        present = [(n, c) for n, c in terms if n in layer.lora_A]
        for n, c in present:
            layer.set_scale(n, c)
        if present:
            layer.merge(adapter_names=[n for n, _ in present])
    ids = {id(layer) for layer in layers}
    for name, module in list(out.named_modules()):
        if id(module) in ids:
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.base_layer)
    return out.requires_grad_(False)


def held_params(model: nn.Module, names: Sequence[str], parts: Sequence[str]) -> int:
    """Parameters held to run ``parts``: the base weights once, plus the LoRA weights of each
    ``expert{i}`` (adapter ``names[i]``) among them."""
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    for part in parts:
        if part.startswith("expert"):
            name = names[int(part[len("expert"):])]
            total += sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n)
    return total


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The weights of adapter ``name`` (PEFT key layout, adapter name removed)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by ``adapter_state`` into adapter ``name``."""
    from peft.utils import set_peft_model_state_dict

    try:
        res = set_peft_model_state_dict(model, state, adapter_name=name)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise UsageError(f"adapter weights do not fit the model ({detail[:200]})") from None
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise UsageError(f"adapter weights do not fit the model: unexpected {bad[:3]}")


class LoraSoup(nn.Module):
    """Rewarded soup of LoRA experts on one base: ``W = W0 + sum_i c_i dW_i`` in every layer.

    It runs PEFT's multi-adapter forward with adapter ``i`` scaled by ``c_i`` (no weight is
    copied); zero coefficients drop their adapter, so ``c = e_i`` is exactly expert ``i``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], coefs: Sequence[float]):
        super().__init__()
        if len(names) != len(coefs):
            raise UsageError(f"soup: {len(coefs)} coefficients for {len(names)} adapters")
        self.model = model
        self.terms = [(n, float(c)) for n, c in zip(names, coefs, strict=True) if c != 0.0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with soup_adapters(self.model, self.terms):
            return self.model(x, t, **cond)


def base_sha256(model: nn.Module) -> str:
    """sha256 of the network's own weights (LoRA layers left out, PEFT's wrapping undone):
    which base an adapter was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()
