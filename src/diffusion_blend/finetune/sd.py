"""``dblend finetune sd``: a LoRA expert for a local diffusers pipeline, trained by the
project's engine (DPOK or pathwise) on the prompts of a file, resumable, saved in diffusers'
LoRA format (``OUT/lora``) for ``dblend sample sd --experts``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_blend.adapters import AdapterView, add_lora
from diffusion_blend.blend import Denoiser, Guided
from diffusion_blend.domains import sd
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import Task
from diffusion_blend.finetune.run import train
from diffusion_blend.io import write_json
from diffusion_blend.rewards import get_reward


def finetune_sd(model: str | Path, prompts_file: str | Path, reward: str, cfg: FinetuneConfig,
                out: str | Path, reward_kwargs: dict | None = None, guidance: float = 7.5,
                height: int | None = None, width: int | None = None, resume: bool = False,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune, then write ``OUT/lora/pytorch_lora_weights.safetensors`` and ``result.json``."""
    cfg.check()
    prompts = sd.read_prompts(prompts_file)
    r = get_reward(reward, **(reward_kwargs or {}))
    pipe = sd.load_pipeline(model)
    task = make_sd_task(pipe, prompts, r, cfg, guidance, height, width)
    meta = {"domain": "sd", "model": str(model), "prompts": prompts, "reward": reward,
            "reward_kwargs": {k: str(v) for k, v in (reward_kwargs or {}).items()},
            "guidance": guidance, "latent_shape": list(task.shape)}
    out = Path(out)
    last = train(task, cfg, out, meta, resume=resume, overwrite=overwrite, progress=progress)
    lora = sd.save_sd_expert(pipe.unet, out / "lora")
    result = {"last_iteration": last, "lora": str(lora), **meta}
    write_json(out / "result.json", result)
    return result


def make_sd_task(pipe: Any, prompts: Sequence[str], reward: Callable, cfg: FinetuneConfig,
                 guidance: float = 7.5, height: int | None = None,
                 width: int | None = None) -> Task:
    """A fine-tuning ``Task`` on ``pipe``: a LoRA adapter on its UNet is the policy, the UNet
    without it the reference, both with classifier-free guidance ``guidance``."""
    unet, schedule = pipe.unet, sd.schedule_of(pipe)
    unet.requires_grad_(False)
    add_lora(unet, sd.ADAPTER, cfg.lora_rank, sd.LORA_TARGETS, seed=cfg.seed)
    bank = sd.PromptBank(pipe, prompts)
    kind = pipe.scheduler.config.prediction_type

    def guided(name: str | None) -> Denoiser:
        den = sd.UNetEps(AdapterView(unet, name), schedule, kind)
        return den if guidance == 1.0 else Guided(den, guidance,
                                                  {"encoder_hidden_states": bank.uncond})

    policy = _TrainableView(guided(sd.ADAPTER), unet)
    latent_reward = sd.LatentReward(pipe.vae, reward, prompts)
    shape = sd.latent_shape(pipe, height, width)
    return Task(policy, guided(None), latent_reward, schedule, shape,
                differentiable=latent_reward.differentiable, cond=bank, device=pipe.device)


class _TrainableView(nn.Module):
    """The guided policy as a module whose parameters are the UNet's (the LoRA ones train)."""

    def __init__(self, denoiser, unet: nn.Module):
        super().__init__()
        self.denoiser, self.unet = denoiser, unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoiser(x, t, **cond)
