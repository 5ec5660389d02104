"""ImageReward from a checkpoint in the original (BLIP) key layout, on a tiny model."""

import torch

from diffusion_blend.rewards import get_reward
from diffusion_blend.rewards.imagereward import MEAN, STD
from diffusion_blend.rewards.images import AestheticHead, clip_pixels

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "apple", "pear",
         "photo", "of"]


def tiny_parts():
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=4, layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=len(VOCAB) + 2, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=40,
        bos_token_id=None, sep_token_id=None, pad_token_id=0), add_pooling_layer=False).eval()
    head = AestheticHead(24).eval()
    return vision, text, head


def original_layout(vision, text, head) -> dict:
    """The keys BLIP's VisionTransformer / med BERT and ImageReward's MLP save under."""
    out = {}
    for k, v in vision.state_dict().items():
        k = (k.replace("embeddings.class_embedding", "cls_token")
             .replace("embeddings.position_embedding", "pos_embed")
             .replace("embeddings.patch_embedding.", "patch_embed.proj.")
             .replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1")
             .replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
             .replace("self_attn.projection", "attn.proj").replace("post_layernorm.", "norm."))
        out["blip.visual_encoder." + k] = v
    out |= {"blip.text_encoder." + k: v for k, v in text.state_dict().items()}
    out |= {"mlp." + k: v for k, v in head.state_dict().items()}
    out["blip.text_decoder.cls.predictions.bias"] = torch.zeros(3)   # unused parts are skipped
    return out


def test_imagereward_from_the_original_layout_matches_the_model_it_describes(tmp_path):
    from transformers import BertTokenizer

    vision, text, head = tiny_parts()
    torch.save(original_layout(vision, text, head), tmp_path / "ImageReward.pt")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(tmp_path / "tok" / "vocab.txt")).save_pretrained(tmp_path / "tok")
    reward = get_reward("imagereward", model=tmp_path, tokenizer=tmp_path / "tok",
                        vision_heads=4, text_heads=4)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    prompts = ["a red apple", "a photo of a blue pear"]
    got = reward(images, prompt=prompts)
    tok = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                           return_tensors="pt")
    assert tok["input_ids"][0, 0] == VOCAB.index("[CLS]") and len(reward.tokenizer) == 14
    with torch.no_grad():
        img = vision(pixel_values=clip_pixels(images, 16)).last_hidden_state
        h = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                 encoder_hidden_states=img, is_decoder=False).last_hidden_state[:, 0]
        want = (head(h) - MEAN) / STD
    assert torch.allclose(got, want, atol=1e-5) and got.shape == (2,)
    (g,) = torch.autograd.grad(got.sum(), images)
    assert g.abs().sum() > 0
