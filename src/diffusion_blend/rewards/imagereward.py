"""ImageReward (Xu et al., 2023) on transformers' BLIP classes, from the original checkpoint.

The model is BLIP's ViT image encoder, its BERT text encoder with cross-attention to the image
tokens, and an MLP on the text's first token: ``(mlp(h_cls) - mean) / std``. The original
``ImageReward.pt`` (a plain state dict, read with ``weights_only=True``) is mapped onto
``BlipVisionModel`` / ``BlipTextModel``; the tokenizer is BERT's (``bert-base-uncased``) with
BLIP's two added tokens. Sizes are read from the checkpoint's shapes; the head counts (16 for
the ViT-L image encoder, 12 for the text encoder) are not in the shapes and are arguments.
Preprocessing (bicubic resize, CLIP normalisation) is in torch, so the reward is differentiable.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from diffusion_blend.io import read_state_dict
from diffusion_blend.rewards import register
from diffusion_blend.rewards.images import (
    AestheticHead,
    clip_pixels,
    local_tokenizer,
    missing_weights,
)

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
_VISION = [(r"^cls_token$", "embeddings.class_embedding"),
           (r"^pos_embed$", "embeddings.position_embedding"),
           (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
           (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
           (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
           (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
           (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
           (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
           (r"^norm\.", "post_layernorm.")]


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The original checkpoint's image encoder (renamed to ``BlipVisionModel``), text encoder
    (``BlipTextModel`` uses BLIP's own BERT names) and MLP head; the rest is unused."""
    vision, text, head = {}, {}, {}
    for key, v in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pat, rep in _VISION:
                name, n = re.subn(pat, rep, name)
                if n:
                    break
            vision[name] = v
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder."):]] = v
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = v
    return vision, text, head


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def build_models(vision: dict, text: dict, vision_heads: int, text_heads: int):
    """``BlipVisionModel`` and ``BlipTextModel`` sized from the checkpoint, weights loaded."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    width, patch = vision["embeddings.class_embedding"].shape[-1], \
        vision["embeddings.patch_embedding.weight"].shape[-1]
    side = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vcfg = BlipVisionConfig(
        hidden_size=width, patch_size=patch, image_size=side * patch, layer_norm_eps=1e-6,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(vision, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=vision_heads)
    words = text["embeddings.word_embeddings.weight"]
    tcfg = BlipTextConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(text, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads, encoder_hidden_size=width,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        bos_token_id=None, sep_token_id=None, pad_token_id=0)
    vmodel, tmodel = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    vmodel.load_state_dict(vision)
    tmodel.load_state_dict(text)
    return vmodel.eval(), tmodel.eval()


class ImageReward(nn.Module):
    """ImageReward of images ``[B, 3, H, W]`` in [0, 1] for their prompts."""

    differentiable = True

    def __init__(self, vision: nn.Module, text: nn.Module, head: AestheticHead, tokenizer):
        super().__init__()
        self.name, self.vision, self.text, self.head = "imagereward", vision, text, head.eval()
        self.tokenizer = tokenizer
        self.requires_grad_(False)

    def forward(self, x0: torch.Tensor, prompt=None, **_) -> torch.Tensor:
        from diffusion_blend.errors import UsageError

        if prompt is None:
            raise UsageError("reward 'imagereward' needs the prompts (prompt=[...])")
        prompts = [prompt] * x0.shape[0] if isinstance(prompt, str) else list(prompt)
        size = self.vision.config.image_size
        img = self.vision(pixel_values=clip_pixels(x0, size)).last_hidden_state
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=MAX_TOKENS, return_tensors="pt").to(x0.device)
        out = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        encoder_hidden_states=img, is_decoder=False,
                        encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long,
                                                          device=img.device))
        return (self.head(out.last_hidden_state[:, 0].float()) - MEAN) / STD


def load_tokenizer(tokenizer):
    """BERT's tokenizer (local) with BLIP's added ``[DEC]`` and ``[ENC]`` tokens."""
    from transformers import BertTokenizer

    if not isinstance(tokenizer, str | Path):
        return tokenizer
    tok = local_tokenizer(BertTokenizer, tokenizer, "imagereward", "Download the tokenizer "
                          f"(`huggingface-cli download {tokenizer}`) or pass "
                          "tokenizer=LOCAL_DIR.")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def read_checkpoint(model) -> dict[str, torch.Tensor]:
    path = Path(model)
    if path.is_dir():
        path = path / "ImageReward.pt"
    if not path.is_file():
        raise missing_weights("imagereward", str(model), "Get ImageReward.pt "
                              "(`huggingface-cli download THUDM/ImageReward ImageReward.pt`) "
                              "and pass model=PATH.")
    return read_state_dict(path, "imagereward checkpoint")


@register("imagereward")
def make_imagereward(model="ImageReward.pt", tokenizer="bert-base-uncased",
                     vision_heads: int = 16, text_heads: int = 12) -> ImageReward:
    vision, text, head_state = split_checkpoint(read_checkpoint(model))
    try:
        vmodel, tmodel = build_models(vision, text, vision_heads, text_heads)
        head = AestheticHead(head_state["layers.0.weight"].shape[1])
        head.load_state_dict(head_state)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise missing_weights("imagereward", str(model), "It does not fit ImageReward's BLIP "
                              f"layout ({type(e).__name__}: {str(e).splitlines()[0][:120]}).") \
            from None
    return ImageReward(vmodel, tmodel, head, load_tokenizer(tokenizer))
