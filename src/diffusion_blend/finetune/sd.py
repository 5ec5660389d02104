"""``dblend finetune sd``: a LoRA expert for a local diffusers pipeline, trained by the
project's engine (DPOK or pathwise) on the prompts of a file, resumable, saved in diffusers'
LoRA format (``OUT/lora``) for ``dblend sample sd --experts``."""

from __future__ import annotations

from pathlib import Path

from diffusion_blend.domains import sd
from diffusion_blend.finetune.config import FinetuneConfig
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
    task = sd.make_sd_task(pipe, prompts, r, cfg, guidance, height, width)
    meta = {"domain": "sd", "model": str(model), "prompts": prompts, "reward": reward,
            "reward_kwargs": {k: str(v) for k, v in (reward_kwargs or {}).items()},
            "guidance": guidance, "latent_shape": list(task.shape)}
    out = Path(out)
    last = train(task, cfg, out, meta, resume=resume, overwrite=overwrite, progress=progress)
    lora = sd.save_sd_expert(pipe.unet, out / "lora")
    result = {"last_iteration": last, "lora": str(lora), **meta}
    write_json(out / "result.json", result)
    return result
