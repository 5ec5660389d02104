"""The ``sd`` domain: any local diffusers text-to-image pipeline (Stable Diffusion 1.5, SDXL, ...)
with LoRA experts, plugged into the project's sampler and fine-tuning engine.

Nothing is downloaded: a pipeline loads from a local directory or the local hub cache, and a
missing one is a ``UsageError`` that says how to provide it. Fine-tuning works on the latent
DDPM chain of eps- or v-prediction UNets (the engine's Gaussian steps); the decoded image is
scored by an image reward with the prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_blend.adapters import AdapterView, LoraSoup, adapter_names, held_params
from diffusion_blend.amortised import AMORTISED_ADAPTER, AmortisedModel, attach_amortised
from diffusion_blend.blend import Denoiser, Guided, Preference, nfe_of
from diffusion_blend.errors import UsageError
from diffusion_blend.offline import hub_offline
from diffusion_blend.pipelines import BlendedModel
from diffusion_blend.sampling import Schedule, to_eps

log = logging.getLogger(__name__)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # DPOK's / the paper's attention LoRA
ADAPTER = "expert"


def default_device() -> torch.device:
    """The machine's accelerator when it has one (CUDA, MPS, XPU, ...), else the CPU; under
    ``accelerate launch`` each process's own device."""
    from diffusion_blend.distributed import Dist

    dist = Dist()
    if dist.world > 1:
        return dist.device()
    return torch.accelerator.current_accelerator() or torch.device("cpu")


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> Any:
    """A diffusers pipeline from a local directory or the local hub cache (never the network),
    on ``device`` (default: ``default_device()``)."""
    from diffusers import DiffusionPipeline

    if str(model).startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"--model {model}: no such directory (a pipeline saved with "
                         "`pipe.save_pretrained(DIR)`, or a hub id in the local cache)")
    try:
        with hub_offline():
            pipe = DiffusionPipeline.from_pretrained(str(Path(model).expanduser()) if Path(
                model).expanduser().is_dir() else str(model), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--model {str(model)!r}: no local diffusers pipeline there ({_first(e)})"
                         f". Download it where there is internet (`huggingface-cli download "
                         f"{model}`) and copy the cache here, or give a local directory made "
                         "with `pipe.save_pretrained(DIR)`") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def save_image_row(images: torch.Tensor, path: str | Path) -> None:
    """Images ``[N, 3, H, W]`` in [0, 1] side by side in one PNG (written atomically)."""
    from diffusion_blend.io import atomic_write, image_row

    row = image_row(images)
    atomic_write(path, lambda p: row.save(p, format="PNG"))


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file (one prompt per line)")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one prompt per line)")
    return prompts


class UNetEps(nn.Module):
    """``denoiser(x, t, encoder_hidden_states) -> eps`` over a diffusers UNet (v converted to
    eps; a batch-1 conditioning is expanded to the batch). Extra conditioning keys are ignored."""

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"prediction type {prediction_type!r}: the latent DDPM chain "
                             "needs 'epsilon' or 'v_prediction'")
        self.unet, self.kind = unet, "eps" if prediction_type == "epsilon" else "v"
        self.abar = schedule.abar

    @property
    def nfe(self) -> float:
        return nfe_of(self.unet)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, **_) -> torch.Tensor:
        ehs = encoder_hidden_states
        if ehs.shape[0] == 1 and x.shape[0] > 1:
            ehs = ehs.expand(x.shape[0], *ehs.shape[1:])
        pred = self.unet(x, t, encoder_hidden_states=ehs.to(x.dtype)).sample
        return to_eps(pred, x, float(self.abar[int(t.reshape(-1)[0])]), self.kind)


class PromptBank:
    """The prompts' text embeddings, computed once; sample ``s`` gets prompt ``s % P``."""

    def __init__(self, pipe, prompts: Sequence[str]):
        self.prompts = list(prompts)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(self.prompts, pipe.device, 1, True)
        self.cond, self.uncond = cond.detach(), uncond[:1].detach()

    def index(self, seeds: Sequence[int]) -> torch.Tensor:
        return torch.tensor([int(s) % len(self.prompts) for s in seeds], dtype=torch.long)

    def __call__(self, seeds: Sequence[int]) -> dict:
        idx = self.index(seeds)
        return {"encoder_hidden_states": self.cond[idx.to(self.cond.device)], "prompt_idx": idx}


class LatentReward:
    """An image reward of the decoded latents, with each sample's prompt."""

    def __init__(self, vae: nn.Module, reward, prompts: Sequence[str]):
        self.vae, self.reward, self.prompts = vae.requires_grad_(False), reward, list(prompts)
        self.name = getattr(reward, "name", "reward")
        self.differentiable = getattr(reward, "differentiable", False)

    def __call__(self, latents: torch.Tensor, prompt_idx=None, **_) -> torch.Tensor:
        prompts = [self.prompts[int(i)] for i in prompt_idx]
        return self.reward(decode_latents(self.vae, latents), prompt=prompts)


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from the pipeline's latents (its VAE's scaling and shift undone)."""
    cfg = vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    img = vae.decode(z.to(vae.dtype)).sample
    return ((img.float() + 1) / 2).clamp(0, 1)


def latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple:
    scale = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * scale
    return (pipe.unet.config.in_channels, (height or size) // scale, (width or size) // scale)


def schedule_of(pipe: Any) -> Schedule:
    return Schedule(pipe.scheduler.betas.double().clone())


def save_sd_expert(unet: nn.Module, out: str | Path, adapter: str = ADAPTER) -> Path:
    """The adapter in diffusers' LoRA format: ``pipe.load_lora_weights(out, adapter_name=...)``."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=state)
    return Path(out) / "pytorch_lora_weights.safetensors"


def load_experts(pipe: Any, experts: Sequence[str | Path]) -> list[str]:
    """Load each LoRA directory onto the pipeline as adapter ``e0, e1, ...``."""
    names = []
    for i, path in enumerate(experts):
        if not Path(path).exists():
            raise UsageError(f"--experts: {path} does not exist (a LoRA directory or "
                             ".safetensors file, e.g. from `dblend finetune sd`)")
        try:
            with hub_offline():
                pipe.load_lora_weights(str(path), adapter_name=f"e{i}")
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UsageError(f"--experts: {path} is not a LoRA diffusers can load "
                             f"({_first(e)}); legacy files: `dblend convert-lora`") from None
        names.append(f"e{i}")
    return names


class SdDomain:
    """sd as a ``Domain``: a local diffusers pipeline with one LoRA expert per reward (loaded
    as adapters ``e0, e1, ...`` on the one UNet), classifier-free guidance on every model, image
    rewards of the decoded latents with each sample's prompt (seed ``s`` gets prompt
    ``s % P``). MORL adapters are given as ``{w[0]: LoRA dir}``. Rewards are optional for
    plain sampling (``reward_names`` is then empty)."""

    name = "sd"

    def __init__(self, model, experts, prompts, rewards=(), steps: int | None = None,
                 guidance: float = 7.5, reward_kwargs: list[dict] | None = None,
                 morl: dict[float, str] | None = None, height=None, width=None,
                 alpha: float = 0.01, amortised: str | Path | None = None):
        from diffusion_blend.rewards import get_reward

        if rewards and len(experts) != len(rewards):
            raise UsageError(f"--experts ({len(experts)}) and --rewards ({len(rewards)}) must "
                             "pair up: one expert per reward")
        self.pipe = load_pipeline(model)
        self.unet, self.guidance, self.alpha = self.pipe.unet, guidance, alpha
        self.names = load_experts(self.pipe, experts)
        self.bank = PromptBank(self.pipe, prompts)
        self.schedule, self.steps = schedule_of(self.pipe), steps or 50
        self.shape = latent_shape(self.pipe, height, width)
        kwargs = reward_kwargs or [{} for _ in rewards]
        self.reward_fns = [LatentReward(self.pipe.vae, get_reward(r, **kw), prompts)
                           for r, kw in zip(rewards, kwargs, strict=True)]
        self.reward_names = list(rewards)
        self.differentiable = bool(rewards) and all(r.differentiable for r in self.reward_fns)
        self.base = self._guided(AdapterView(self.unet, None))
        self.experts = [self._guided(AdapterView(self.unet, n)) for n in self.names]
        self.morl_dirs = {float(k): v for k, v in (morl or {}).items()}
        self.amortised_dir, self._amortised = amortised, None

    def _guided(self, module: nn.Module) -> Denoiser:
        den = UNetEps(module, self.schedule, self.pipe.scheduler.config.prediction_type)
        return Guided(den, self.guidance, {"encoder_hidden_states": self.bank.uncond})

    def set_prompts(self, prompts: Sequence[str]) -> None:
        """Sample from other prompts (the UI's text box); the rewards follow them."""
        self.bank = PromptBank(self.pipe, prompts)
        for r in self.reward_fns:
            r.prompts = list(prompts)

    def cond(self, seeds: list[int]) -> dict:
        return self.bank(seeds)

    def strata(self, seeds: list[int]) -> torch.Tensor:
        return self.bank.index(seeds)

    def rewards(self, x0: torch.Tensor, prompt_idx: torch.Tensor | None = None,
                **_) -> torch.Tensor:
        if not self.reward_fns:
            return torch.zeros(len(x0), 0)
        return torch.stack([r(x0, prompt_idx=prompt_idx) for r in self.reward_fns], 1)

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decode_latents(self.pipe.vae, x0)

    def blend(self, pref: Preference) -> Denoiser:
        """Every term in one routed UNet forward, guided once (the blend commutes with
        guidance: its coefficients sum to one)."""
        return self._guided(BlendedModel(self.unet, self.names, pref))

    def soup(self, coefs: list[float]) -> Denoiser:
        return self._guided(LoraSoup(self.unet, self.names, coefs))

    def morl(self, pref: Preference) -> Denoiser | None:
        if pref.lam == 1.0 and max(pref.w) == 1.0:
            return self.experts[pref.w.index(1.0)]
        path = self.morl_dirs.get(pref.w[0]) if pref.lam == 1.0 else None
        if path is None:
            return None
        name = f"morl{len(self.morl_dirs)}_{round(pref.w[0] * 100):03d}"
        if name not in adapter_names(self.unet):
            with hub_offline():
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        return self._guided(AdapterView(self.unet, name))

    def amortised(self, pref: Preference) -> Denoiser | None:
        """The distilled blend of these experts (``dblend distill sd``), where one was given:
        one network evaluation per step (guided)."""
        if self.amortised_dir is None:
            return None
        if self._amortised is None:
            emb, meta = attach_amortised(self.unet, self.amortised_dir)
            if len(meta["experts"]) != len(self.names):
                raise UsageError(f"--amortised {self.amortised_dir} blends "
                                 f"{len(meta['experts'])} experts; --experts gives "
                                 f"{len(self.names)}")
            self._amortised = AmortisedModel(self.unet, AMORTISED_ADAPTER, emb, pref,
                                             meta["config"]["lam_max"], True)
        self._amortised.preference = pref
        return self._guided(self._amortised)

    def conditioned(self, pref: Preference) -> None:
        return None

    def target(self, pref: Preference) -> None:
        return None

    def params(self, parts: list[str]) -> int:
        return held_params(self.unet, self.names, parts)
