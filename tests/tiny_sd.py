"""Tiny diffusers pipelines built offline in milliseconds (random weights, local tokenizer)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def write_clip_tokenizer(path: Path) -> Path:
    """A CLIP BPE tokenizer vocabulary of single characters (no merges)."""
    path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def clip_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(write_clip_tokenizer(path) / "vocab.json"),
                         str(path / "merges.txt"), model_max_length=16)


def clip_text_config(vocab_size: int = 100):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=vocab_size, max_position_embeddings=16,
                          projection_dim=32)


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny CLIP (16x16 images, 32-d embeddings) and its tokenizer, saved like a hub
    snapshot (what the CLIP-based rewards load)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        vision = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32,
                                  intermediate_size=37, num_attention_heads=4,
                                  num_hidden_layers=2, projection_dim=32)
        cfg = CLIPConfig(text_config=clip_text_config().to_dict(),
                         vision_config=vision.to_dict(), projection_dim=32)
        CLIPModel(cfg).save_pretrained(path)
        clip_tokenizer(path / "tok").save_pretrained(path)
    return path


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=8, **extra).eval()


def tiny_sd_pipeline(tmp: Path, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` with 8x8 images (latents 4x8x8), DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    text = CLIPTextModel(clip_text_config()).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text,
                                   tokenizer=clip_tokenizer(tmp / "tokenizer"),
                                   unet=tiny_unet(), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4).eval()


def tiny_sd3_pipeline():
    """A flow-matching ``StableDiffusion3Pipeline`` without text encoders (pass embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet(cross_attention_dim: int = 32, pooled_dim: int = 16, seed: int = 0):
    """SDXL's UNet shape: added conditioning (pooled text embedding and six time ids)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=pooled_dim + 6 * 4).eval()


def tiny_sdxl_pipeline(tmp: Path):
    """A ``StableDiffusionXLPipeline`` with its two text encoders (the second with a pooled
    projection), 8x8 images, added time/text conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_sdxl_unet(cross_attention_dim=64, pooled_dim=32)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()).eval(),
        tokenizer=clip_tokenizer(tmp / "tok1"), tokenizer_2=clip_tokenizer(tmp / "tok2"),
        unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline():
    """A guidance-distilled flow-matching ``FluxPipeline`` (no CFG batch: the guidance scale
    enters the transformer) without text encoders (pass embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=tiny_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline_with_encoders(tmp: Path):
    """``StableDiffusion3Pipeline`` with its two CLIP text encoders (no T5: diffusers then uses
    zeros for its part), joint and pooled conditioning of 64 dimensions."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
        pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0),
        text_encoder=CLIPTextModelWithProjection(clip_text_config()).eval(),
        tokenizer=clip_tokenizer(tmp / "tok1"),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()).eval(),
        tokenizer_2=clip_tokenizer(tmp / "tok2"), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
