"""The blend inside any diffusers pipeline: ``blend_pipeline`` installs it as the forward of
``pipe.unet`` / ``pipe.transformer``, which stays the real model, so the pipeline's own
``__call__``, scheduler, classifier-free guidance, callbacks, output types and LoRA API stay
untouched (the calls that would change which adapters run are refused while blended).

``BlendedModel`` returns ``c_pre * pred_pre + sum_i c_i * pred_i`` (``c = lam * w``,
``c_pre = 1 - lam * sum(w)``): the coefficients sum to one, so the blend is affine in the
prediction. Hence it works for eps-, v- and flow-prediction models alike, and it commutes with
classifier-free guidance: guiding the blend, ``u + s (c - u)`` of blended predictions, equals
blending the guided predictions of each model.

LoRA experts (adapter names on the one base module) are evaluated in **one** forward by
default: the batch is repeated once per blend term and each block of rows is routed to its
adapter (PEFT's mixed batch forward), so the base weights are held once; ``mode`` trades memory
for time (see ``BlendedModel``). Full fine-tuned modules are also accepted (the paper's
setting): then each model runs separately. Text-encoder LoRA layers are blended too: each term
encodes the prompt with its own text-encoder adapter (``TextTerms``).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import is_dataclass, replace
from pathlib import Path

import torch
from torch import nn

from diffusion_blend.adapters import (
    BASE,
    adapter_names,
    dora_adapters,
    fused,
    merged_copy,
    route_rows,
    soup_adapters,
    unit_scales,
)
from diffusion_blend.amortised import (
    AMORTISED_ADAPTER,
    AmortisedModel,
    attach_amortised,
)
from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.errors import UsageError


def _batch_of(args: tuple, kwargs: dict) -> int:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    raise UsageError("the denoiser was called without a batched tensor input")


def repeat_batch(v, b: int, n: int):
    """Repeat every tensor whose first dimension is the batch ``n`` times (through dicts,
    lists and tuples); anything else (scalar timesteps, flags) passes through."""
    return stack_batches([v] * n, b)


def stack_batches(per_term: list, b: int):
    """Per-term arguments of batch ``b`` stacked along the batch (through dicts, lists and
    tuples); anything without the batch dimension is taken from the first."""
    first = per_term[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(per_term) if first.ndim > 0 and first.shape[0] == b else first
    if isinstance(first, dict):
        return {k: stack_batches([d[k] for d in per_term], b) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(stack_batches(list(v), b) for v in zip(*per_term, strict=True))
    return first


def prediction_of(out) -> torch.Tensor:
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


MODES = ("batched", "sequential", "merged", "auto")


class BlendedModel(nn.Module):
    """A pipeline denoiser returning the blend of a base and K experts (see module docstring).

    ``experts``: adapter names loaded on ``base``, or full modules with the same call signature
    as ``base``. ``mode``: ``batched`` runs every LoRA term in one routed forward (the batch
    repeated once per term: K + 1 times the activations); ``sequential`` runs the terms one
    after another and accumulates in place (one model's activations); ``merged`` gives each
    term its own copy of the network with its adapter merged (K + 1 weight sets; each term at a
    plain model's cost, no LoRA overhead); ``auto`` is merged when those copies fit in half the
    free memory of the model's device, else batched, and switches to sequential for good when
    the accelerator runs out of memory. DoRA experts are
    always evaluated one after another (PEFT cannot route them by rows). Each LoRA term runs
    at its adapter's trained scale, whatever ``set_adapters(..., adapter_weights=...)`` set.
    ``call`` runs the base network (default: ``base`` itself; ``blend_pipeline`` passes the
    module's own forward). Set ``preference`` between calls: nothing is reloaded.
    """

    def __init__(self, base: nn.Module, experts: Sequence[str | nn.Module],
                 preference: Preference, mode: str = "batched", call: Callable | None = None):
        super().__init__()
        if not experts:
            raise UsageError("blend: give at least one expert (adapter name or module)")
        if mode not in MODES:
            raise UsageError(f"blend mode {mode!r} is not known; use one of {MODES}")
        self.base, self.mode, self._call = base, mode, call
        self.expert_modules = nn.ModuleList([e for e in experts if isinstance(e, nn.Module)])
        self.adapters = [e for e in experts if isinstance(e, str)]
        if self.adapters and len(self.expert_modules):
            raise UsageError("blend: experts must be all adapter names or all modules")
        self._check_adapters()
        self.k = len(experts)
        self.routable = not dora_adapters(base, self.adapters)
        # the term algebra (coefficients, which terms run) is the core blend's, over keys:
        # ``BASE`` and adapter names, or the modules themselves
        self.blend = BlendedDenoiser(BASE if self.adapters else base,
                                     self.adapters or list(self.expert_modules), preference)
        self.text_terms: dict | None = None   # each term's prompt encoding (blend_pipeline)
        self._copies: dict | None = None      # merged mode: each term's network
        self._plan: str | None = None         # what auto mode chose

    def _check_adapters(self) -> None:
        if not self.adapters:
            return
        known = adapter_names(self.base)
        missing = [a for a in self.adapters if a not in known]
        if missing:
            raise UsageError(f"adapters {missing} are not loaded on the base model; loaded: "
                             f"{sorted(known) or 'none'}")
        if fused(self.base):
            raise UsageError("adapters are fused into the base weights (pipe.fuse_lora()), so "
                             "the base term would not be the base: call pipe.unfuse_lora() "
                             "before blending")

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
        with unit_scales(self.base, self.adapters):
            if len(terms) == 1 and terms[0][0] == 1.0:   # lam = 0 or w = e_i: that model
                return self._single(terms[0][1], args, kwargs)
            plan = self._resolved_plan() if self.adapters else "sequential"
            if plan == "merged":
                copies = self._merged_copies()
                return self._sequential([(c, copies[n]) for c, n in terms], args, kwargs)
            if plan == "batched" and self.routable:
                try:
                    return self._batched(terms, args, kwargs)
                except torch.OutOfMemoryError:
                    if self.mode != "auto":
                        raise
                    self._plan = "sequential"
            return self._sequential(terms, args, kwargs)

    def _run(self, *args, **kwargs):
        return (self._call or self.base)(*args, **kwargs)

    def _resolved_plan(self) -> str:
        """The mode in force: auto is merged when the K + 1 weight sets fit in half the free
        memory of the model's device, else batched (decided once; sequential after an
        out-of-memory)."""
        if self.mode != "auto":
            return self.mode
        if self._plan is None:
            need = (len(self.adapters) + 1) * sum(p.numel() * p.element_size()
                                                  for p in self.base.parameters())
            free = free_memory(next(self.base.parameters()).device)
            self._plan = "merged" if free is not None and need < free / 2 else "batched"
        return self._plan

    def _merged_copies(self) -> dict:
        """Each term's network (the base, and each adapter merged into its own copy), made on
        first use; the installed forward is set aside while copying."""
        if self._copies is None:
            own = self.base.__dict__.pop("forward", None)
            try:
                self._copies = {n: _Term(merged_copy(self.base, None if n == BASE else n), n,
                                         self) for n in (BASE, *self.adapters)}
            finally:
                if own is not None:
                    object.__setattr__(self.base, "forward", own)
        return self._copies

    def _term_kwargs(self, name, kwargs: dict) -> dict:
        """``kwargs`` with the prompt encoding of term ``name``'s own text-encoder adapter
        where the pipeline passed the base term's (see ``TextTerms``)."""
        return kwargs if self.text_terms is None else self.text_terms.swap(name, kwargs)

    def _single(self, model, args: tuple, kwargs: dict):
        """One model's own forward (the same code path as running it alone: bit-identical)."""
        kwargs = self._term_kwargs(model, kwargs) if isinstance(model, str) else kwargs
        if model is self.base:
            return self._run(*args, **kwargs)
        if isinstance(model, nn.Module | _Term):
            return model(*args, **kwargs)
        with soup_adapters(self.base, [] if model == BASE else [(model, 1.0)]):
            return self._run(*args, **kwargs)

    def _sequential(self, terms, args: tuple, kwargs: dict):
        """The terms one after another, accumulated in place (one model's activations)."""
        out, acc = None, None
        for c, model in terms:
            o = self._single(model, args, kwargs)
            pred = prediction_of(o)
            dtype = _accumulation_dtype(pred)
            acc = c * pred.to(dtype) if acc is None else acc.add_(pred.to(dtype), alpha=c)
            out = o if out is None else out
        return _like(out, acc.to(prediction_of(out).dtype))

    def _batched(self, terms, args: tuple, kwargs: dict):
        """Every term in one forward: the batch repeated per term, rows routed to adapters."""
        b, n = _batch_of(args, kwargs), len(terms)
        names = [name for _, name in terms for _ in range(b)]
        if self.text_terms is None:
            kw = repeat_batch(kwargs, b, n)
        else:
            kw = stack_batches([self._term_kwargs(name, kwargs) for _, name in terms], b)
        with route_rows(self.base, names):
            out = self._run(*repeat_batch(args, b, n), **kw)
        preds = prediction_of(out).split(b)
        dtype = _accumulation_dtype(preds[0])
        blend = sum(c * p.to(dtype) for (c, _), p in zip(terms, preds, strict=True))
        return _like(out, blend.to(preds[0].dtype))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)


class _Term:
    """A term's merged network, called with that term's prompt encoding (``TextTerms``)."""

    def __init__(self, network: nn.Module, name: str, blend: BlendedModel):
        self.network, self.name, self.blend = network, name, blend

    def __call__(self, *args, **kwargs):
        return self.network(*args, **self.blend._term_kwargs(self.name, kwargs))


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (an accelerator: its runtime's view; CPU: ``MemAvailable``), or
    None where it cannot be read."""
    if device.type != "cpu":
        try:
            return torch.accelerator.get_memory_info(device)[0]
        except (RuntimeError, ValueError, TypeError):
            return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    return int(m.group(1)) * 1024 if m else None


def _accumulation_dtype(pred: torch.Tensor) -> torch.dtype:
    """The prediction's own dtype, at least float32 (half precision is summed in float32)."""
    return torch.promote_types(pred.dtype, torch.float32)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class TextTerms:
    """Each blend term's prompt encoding, for pipelines whose text encoders carry the experts'
    LoRA layers too: ``encode_prompt`` runs once per term (the base with every adapter off,
    expert ``i`` with only adapter ``i`` on, at its trained scale) and the pipeline receives
    the base's. In the denoiser's call, every tensor built from the base's encoding (one of
    its outputs, or two of them concatenated, as classifier-free guidance does) is rebuilt
    from the term's own."""

    def __init__(self, encodings: dict):
        self.encodings = encodings

    def swap(self, name, kwargs: dict) -> dict:
        mine, base = self.encodings.get(name), self.encodings[BASE]
        if mine is None or mine is base:
            return kwargs
        return {k: self._rebuilt(v, base, mine) for k, v in kwargs.items()}

    def _rebuilt(self, v, base: tuple, mine: tuple):
        if isinstance(v, dict):
            return {k: self._rebuilt(x, base, mine) for k, x in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        for i, b in enumerate(base):
            if _same(v, b):
                return mine[i]
        for i, j in itertools.permutations(range(len(base)), 2):
            if _same(v, base[i], base[j]):
                return torch.cat([mine[i], mine[j]])
        return v


def _same(v: torch.Tensor, *parts) -> bool:
    """Whether ``v`` is ``parts`` concatenated along the batch (tensors only)."""
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return False
    if v.shape[0] != sum(p.shape[0] for p in parts) or any(
            p.shape[1:] != v.shape[1:] for p in parts):
        return False
    return torch.equal(v, parts[0] if len(parts) == 1 else torch.cat(parts))


def _text_encoders(pipe, names: Sequence[str]) -> list[nn.Module]:
    """The pipeline's text encoders that carry LoRA layers of the blend's adapters."""
    encoders = [getattr(pipe, a, None) for a in TEXT_ENCODERS]
    return [e for e in encoders if e is not None and set(names) & set(adapter_names(e))]


def _encode_per_term(pipe, blended: BlendedModel, encoders: list[nn.Module]) -> Callable:
    """``pipe.encode_prompt`` run once per blend term with that term's text-encoder adapter."""
    original = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        names = [name for _, name in blended.terms()]
        encodings = {}
        for name in names if BASE in names else [BASE, *names]:   # the pipeline gets the base's
            terms = [] if name == BASE else [(name, 1.0)]
            with contextlib.ExitStack() as stack:
                for enc in encoders:
                    stack.enter_context(unit_scales(enc, blended.adapters))
                    stack.enter_context(soup_adapters(enc, terms))
                encodings[name] = tuple(original(*args, **kwargs))
        blended.text_terms = TextTerms(encodings)
        return encodings[BASE]

    return encode_prompt


def denoiser_attr(pipe) -> str:
    """``"unet"`` or ``"transformer"``: where the pipeline keeps its denoiser."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise UsageError(f"{type(pipe).__name__} has neither a unet nor a transformer to blend")


BLEND_DECIDES = ("the blend decides which adapters run; call unblend_pipeline(pipe) first (or "
                 "blend_pipeline again with other adapters)")
REFUSED = {name: BLEND_DECIDES for name in (
    "set_adapters", "disable_lora", "enable_lora", "fuse_lora", "unfuse_lora", "delete_adapters",
    "unload_lora_weights")} | {"save_pretrained": (
        "its denoiser holds the experts' LoRA layers, which diffusers would save under names "
        "that load back as a broken base; call unblend_pipeline(pipe) and "
        "pipe.unload_lora_weights() to save the base, and save experts with save_lora_weights")}


def blend_pipeline(pipe, experts: Sequence[str | nn.Module], preference: Preference,
                   mode: str = "batched") -> BlendedModel:
    """Blend ``pipe``'s denoiser: its adapters ``experts`` (loaded with, e.g.,
    ``pipe.load_lora_weights(path, adapter_name=...)``) or full modules. ``pipe.unet`` /
    ``pipe.transformer`` stays the real model (its forward runs the blend), so
    ``get_list_adapters``, the model's config and attributes behave as diffusers documents; the
    calls that would change which adapters run (``set_adapters``, ``disable_lora``,
    ``fuse_lora``, ...) and ``save_pretrained`` are refused while blended, with the fix.
    Returns the ``BlendedModel``: set its ``preference`` between calls; ``unblend_pipeline``
    restores the pipeline."""
    unblend_pipeline(pipe)
    model = getattr(pipe, denoiser_attr(pipe))
    blended = BlendedModel(model, experts, preference, mode, call=model.forward)
    encoders = _text_encoders(pipe, blended.adapters)
    _install(pipe, model, blended)
    if encoders and hasattr(pipe, "encode_prompt"):
        object.__setattr__(pipe, "encode_prompt", _encode_per_term(pipe, blended, encoders))
    return blended


def amortise_pipeline(pipe, directory: str | Path, preference: Preference,
                      allow_extrapolation: bool = False) -> AmortisedModel:
    """Run ``pipe``'s denoiser as the amortised blend distilled into ``directory`` (``dblend
    distill sd``): one network evaluation per step at any ``(w, lam)`` of its training range.
    The pipeline's own ``__call__`` runs; set the returned model's ``preference`` between
    calls; ``unblend_pipeline`` restores the pipeline (the adapter stays loaded, inactive)."""
    unblend_pipeline(pipe)
    model = getattr(pipe, denoiser_attr(pipe))
    emb, meta = attach_amortised(model, directory)
    amortised = AmortisedModel(model, AMORTISED_ADAPTER, emb, preference,
                               meta["config"]["lam_max"], allow_extrapolation)
    _install(pipe, model, amortised)
    return amortised


def _install(pipe, model: nn.Module, forward: nn.Module) -> None:
    """``forward`` as ``model``'s forward (not a submodule: nothing is saved), and the calls
    that would change which adapters run refused."""
    object.__setattr__(model, "forward", forward)
    for name, why in REFUSED.items():
        if hasattr(pipe, name):
            object.__setattr__(pipe, name, _refuse(name, why))


def _refuse(name: str, why: str) -> Callable:
    def refuse(*args, **kwargs):
        raise UsageError(f"pipe.{name}() while the pipeline is blended: {why}")

    return refuse


def unblend_pipeline(pipe) -> None:
    """Undo ``blend_pipeline``: the denoiser's own forward and the pipeline's LoRA API back."""
    model = getattr(pipe, denoiser_attr(pipe))
    if isinstance(model.__dict__.get("forward"), BlendedModel | AmortisedModel):
        del model.forward
    for name in (*REFUSED, "encode_prompt"):
        pipe.__dict__.pop(name, None)
