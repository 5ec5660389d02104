"""HPSv2 (Wu et al., 2023) as a transformers ``CLIPModel`` converted from its open_clip checkpoint.

HPSv2 is an open_clip ViT-H-14 fine-tuned on human preferences; its score is the cosine of the
normalised image and prompt embeddings. The checkpoint (``HPS_v2.1_compressed.pt`` or
``HPS_v2_compressed.pt``: a plain ``{"state_dict": ...}``, read with ``weights_only=True``) is
mapped onto ``CLIPModel`` (fused attention projections split into q, k, v; the projections
transposed), so neither open_clip nor torchvision is needed. Sizes come from the checkpoint's
shapes; the head counts (16 for ViT-H-14's towers) are arguments. The tokenizer is CLIP's BPE
tokenizer (any local CLIP tokenizer, e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from diffusion_blend.io import read_state_dict
from diffusion_blend.rewards import register
from diffusion_blend.rewards.images import ClipSimilarity, local_tokenizer, missing_weights

_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
          ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]


def _tower(state: dict, prefix: str, out_prefix: str) -> dict[str, torch.Tensor]:
    """The transformer blocks under ``prefix`` in CLIPModel's names (q, k, v split)."""
    out = {}
    for key, v in state.items():
        m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$", key)
        if not m:
            continue
        base, rest = f"{out_prefix}encoder.layers.{m.group(1)}.", m.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest[len("attn.in_proj_"):]
            for name, part in zip(("q", "k", "v"), v.chunk(3, 0), strict=True):
                out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        for old, new in _LAYER:
            if rest.startswith(old):
                out[base + new + rest[len(old):]] = v
    return out


def convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict in ``transformers.CLIPModel`` names."""
    out = _tower(state, "visual.", "vision_model.") | _tower(state, "", "text_model.")
    v = "vision_model."
    out |= {f"{v}embeddings.class_embedding": state["visual.class_embedding"],
            f"{v}embeddings.patch_embedding.weight": state["visual.conv1.weight"],
            f"{v}embeddings.position_embedding.weight": state["visual.positional_embedding"],
            f"{v}pre_layrnorm.weight": state["visual.ln_pre.weight"],
            f"{v}pre_layrnorm.bias": state["visual.ln_pre.bias"],
            f"{v}post_layernorm.weight": state["visual.ln_post.weight"],
            f"{v}post_layernorm.bias": state["visual.ln_post.bias"],
            "visual_projection.weight": state["visual.proj"].T.contiguous(),
            "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
            "text_model.final_layer_norm.weight": state["ln_final.weight"],
            "text_model.final_layer_norm.bias": state["ln_final.bias"],
            "text_projection.weight": state["text_projection"].T.contiguous(),
            "logit_scale": state["logit_scale"]}
    return out


def _layers(state: dict, prefix: str) -> int:
    pat = re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."
    return len({m.group(1) for k in state if (m := re.match(pat, k))})


def clip_config(state: dict, vision_heads: int, text_heads: int, act: str = "gelu",
                eos_token_id: int | None = None):
    """A ``CLIPConfig`` sized from the open_clip checkpoint's shapes."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    width, patch = state["visual.class_embedding"].shape[0], state["visual.conv1.weight"].shape[-1]
    side = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    proj = state["visual.proj"].shape[1]
    vision = CLIPVisionConfig(
        hidden_size=width, patch_size=patch, image_size=side * patch, projection_dim=proj,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(state, "visual."), num_attention_heads=vision_heads,
        hidden_act=act)
    tokens, twidth = state["token_embedding.weight"].shape
    text = CLIPTextConfig(
        vocab_size=tokens, hidden_size=twidth, projection_dim=proj, hidden_act=act,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(state, ""), num_attention_heads=text_heads,
        max_position_embeddings=state["positional_embedding"].shape[0],
        eos_token_id=tokens - 1 if eos_token_id is None else eos_token_id, pad_token_id=0)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=proj)


def checkpoint_path(path) -> Path:
    """The checkpoint file (a directory holding one is accepted); missing: a clear error."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
                     if (path / n).is_file()), path / "HPS_v2.1_compressed.pt")
    if not path.is_file():
        raise missing_weights("hpsv2", str(path), "Get HPS_v2.1_compressed.pt "
                              "(`huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt`) "
                              "and pass model=PATH.")
    return path


def load_hpsv2_clip(path, vision_heads: int = 16, text_heads: int = 16, act: str = "gelu",
                    eos_token_id: int | None = None):
    """The HPSv2 checkpoint at ``path`` as a ``CLIPModel`` (pooling the text at the
    tokenizer's end-of-text token, the last id of the vocabulary unless given)."""
    from transformers import CLIPModel

    path = checkpoint_path(path)
    state = read_state_dict(path, "hpsv2 checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model = CLIPModel(clip_config(state, vision_heads, text_heads, act, eos_token_id))
        res = model.load_state_dict(convert_open_clip(state), strict=False)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise missing_weights("hpsv2", str(path), f"It does not fit an open_clip ViT "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}).") from None
    missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
    if missing or res.unexpected_keys:
        raise missing_weights("hpsv2", str(path), f"It does not fit an open_clip ViT (missing "
                              f"{missing[:3]}, unexpected {res.unexpected_keys[:3]}).")
    return model.eval()


@register("hpsv2")
def make_hpsv2(model="HPS_v2.1_compressed.pt",
               tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", vision_heads: int = 16,
               text_heads: int = 16, act: str = "gelu") -> ClipSimilarity:
    """ViT-H-14 (GELU, 16 heads per tower) unless told otherwise."""
    model = checkpoint_path(model)
    tok = _tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    clip = load_hpsv2_clip(model, vision_heads, text_heads, act, tok.eos_token_id)
    return ClipSimilarity("hpsv2", clip, tok, 1.0)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return local_tokenizer(AutoTokenizer, path, "hpsv2", f"Download the tokenizer "
                           f"(`huggingface-cli download {path}`) or pass tokenizer=LOCAL_DIR.")
