"""HPSv2 from a checkpoint in open_clip's layout, on a tiny model."""

import torch
import torch.nn.functional as F

from diffusion_blend.rewards import get_reward
from diffusion_blend.rewards.images import clip_pixels
from tests.tiny_sd import save_tiny_clip


def open_clip_layout(clip) -> dict:
    """What open_clip's CLIP saves: fused in-projections, (in, out) projection matrices."""
    sd, out = clip.state_dict(), {}
    for tower, prefix in (("vision_model.", "visual."), ("text_model.", "")):
        n = clip.config.vision_config.num_hidden_layers if prefix else \
            clip.config.text_config.num_hidden_layers
        for i in range(n):
            a, b = f"{tower}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{b}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{a}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")])
                for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                    out[f"{b}{new}.{kind}"] = sd[f"{a}{old}.{kind}"]
    v = "vision_model."
    out |= {"visual.class_embedding": sd[f"{v}embeddings.class_embedding"],
            "visual.conv1.weight": sd[f"{v}embeddings.patch_embedding.weight"],
            "visual.positional_embedding": sd[f"{v}embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": sd[f"{v}pre_layrnorm.weight"],
            "visual.ln_pre.bias": sd[f"{v}pre_layrnorm.bias"],
            "visual.ln_post.weight": sd[f"{v}post_layernorm.weight"],
            "visual.ln_post.bias": sd[f"{v}post_layernorm.bias"],
            "visual.proj": sd["visual_projection.weight"].T,
            "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
            "ln_final.weight": sd["text_model.final_layer_norm.weight"],
            "ln_final.bias": sd["text_model.final_layer_norm.bias"],
            "text_projection": sd["text_projection.weight"].T, "logit_scale": sd["logit_scale"]}
    return {"module." + k: x for k, x in out.items()}


def test_hpsv2_from_the_open_clip_layout_is_the_cosine_of_the_model_it_describes(tmp_path):
    from transformers import CLIPModel

    clip_dir = save_tiny_clip(tmp_path / "clip")
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    torch.save({"state_dict": open_clip_layout(clip)}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = get_reward("hpsv2", model=tmp_path, tokenizer=clip_dir, vision_heads=4,
                        text_heads=4, act=clip.config.text_config.hidden_act)
    images, prompts = torch.rand(2, 3, 16, 16), ["a red apple", "a blue pear"]
    got = reward(images, prompt=prompts)
    tok = reward.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=clip_pixels(images, 16))
        txt = clip.get_text_features(**tok)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        want = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    assert torch.allclose(got, want, atol=1e-5) and got.abs().max() <= 1.0
