"""Rewards on RGB images ``[B, 3, H, W]`` in [0, 1] (a pipeline's decoded output), with the
prompts as ``prompt=[...]``. Models load lazily from a local path or the local Hugging Face
cache, never from the network; missing weights give an error naming the model and how to get it.

- ``jpeg-compressibility`` / ``jpeg-incompressibility``: minus / plus the JPEG size in kB
  (quality 95; DDPO's rewards). No weights; not differentiable.
- ``clip-score``: ``100 * cos(image, prompt)`` under CLIP (default ViT-L/14).
- ``pickscore``: PickScore, ``logit_scale * cos(image, prompt)`` under its fine-tuned CLIP-H.
- ``aesthetic``: the LAION aesthetic predictor: an MLP head on the normalised CLIP ViT-L/14
  image embedding (about 1-10).
- ``imagereward`` (``rewards/imagereward.py``) and ``hpsv2`` (``rewards/hpsv2.py``): their
  original checkpoints mapped onto transformers' BLIP and CLIP classes.

The CLIP-based rewards resize and normalise in torch, so they are differentiable (for pathwise
fine-tuning and RGG).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_blend.errors import UsageError
from diffusion_blend.io import read_state_dict
from diffusion_blend.offline import hub_offline
from diffusion_blend.rewards import register

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def missing_weights(reward: str, model: str, how: str) -> UsageError:
    return UsageError(f"reward {reward!r} needs the weights of {model!r}: missing or unusable "
                      f"here (nothing is downloaded). {how}")


def _hub_hint(model: str) -> str:
    return (f"Download them where there is internet (`huggingface-cli download {model}`) and "
            "copy the cache here, or pass model=LOCAL_DIR.")


def check_images(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise UsageError(f"image rewards take [B, 3, H, W] images in [0, 1], got shape "
                         f"{tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------- JPEG


class JpegSize:
    """``sign * size_kB`` of each image saved as JPEG (quality 95)."""

    differentiable = False

    def __init__(self, sign: float, name: str):
        self.sign, self.name = sign, name

    def __call__(self, x0: torch.Tensor, **_) -> torch.Tensor:
        from PIL import Image

        imgs = (check_images(x0).detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
        sizes = []
        for im in imgs.cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, device=x0.device)


@register("jpeg-compressibility")
def make_jpeg_compressibility() -> JpegSize:
    return JpegSize(-1.0, "jpeg-compressibility")


@register("jpeg-incompressibility")
def make_jpeg_incompressibility() -> JpegSize:
    return JpegSize(1.0, "jpeg-incompressibility")


# ---------------------------------------------------------------------------- CLIP family


def load_clip(reward: str, model, processor=None):
    """A ``CLIPModel`` and its tokenizer from an object, a local dir or the local hub cache."""
    from transformers import AutoTokenizer, CLIPModel

    if isinstance(model, nn.Module):
        return model.eval(), processor
    try:
        with hub_offline():
            clip = CLIPModel.from_pretrained(str(model), local_files_only=True).eval()
    except (OSError, ValueError):
        raise missing_weights(reward, str(model), _hub_hint(str(model))) from None
    if processor is not None and not isinstance(processor, str | Path):
        return clip, processor
    source = str(processor or model)
    return clip, local_tokenizer(AutoTokenizer, source, reward, _hub_hint(source))


def local_tokenizer(cls, path: str | Path, reward: str, how: str):
    """A tokenizer from a local directory or the hub cache, offline; one without a vocabulary
    (what transformers returns when nothing is found) is refused, not used."""
    try:
        with hub_offline():
            tok = cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        raise missing_weights(reward, str(path), how) from None
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise missing_weights(reward, str(path), how)
    return tok


def clip_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (bicubic, antialiased) and normalise as CLIP's processor does, in torch."""
    x = F.interpolate(check_images(x).float(), size=(size, size), mode="bicubic",
                      antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipSimilarity(nn.Module):
    """``scale * cos(image embedding, prompt embedding)``; ``scale`` None: CLIP's logit scale."""

    differentiable = True

    def __init__(self, name: str, clip: nn.Module, tokenizer, scale: float | None):
        super().__init__()
        self.name, self.clip, self.tokenizer, self.scale = name, clip, tokenizer, scale
        self.clip.requires_grad_(False)

    def image_embeds(self, x0: torch.Tensor) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        return F.normalize(_features(self.clip.get_image_features(
            pixel_values=clip_pixels(x0, size))), dim=-1)

    def text_embeds(self, prompt) -> torch.Tensor:
        if prompt is None:
            raise UsageError(f"reward {self.name!r} needs the prompts (prompt=[...])")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        device = next(self.clip.parameters()).device
        return F.normalize(_features(self.clip.get_text_features(
            **{k: v.to(device) for k, v in tok.items()})), dim=-1)

    def forward(self, x0: torch.Tensor, prompt=None, **_) -> torch.Tensor:
        img, txt = self.image_embeds(x0), self.text_embeds(prompt)
        if txt.shape[0] == 1:
            txt = txt.expand(img.shape[0], -1)
        scale = self.clip.logit_scale.exp() if self.scale is None else self.scale
        return scale * (img * txt).sum(-1)


def _features(out) -> torch.Tensor:
    """transformers 5 may return an output object where 4.x returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@register("clip-score")
def make_clip_score(model="openai/clip-vit-large-patch14", processor=None):
    clip, tok = load_clip("clip-score", model, processor)
    return ClipSimilarity("clip-score", clip, tok, 100.0)


@register("pickscore")
def make_pickscore(model="yuvalkirstain/PickScore_v1",
                   processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    clip, tok = load_clip("pickscore", model, processor)
    return ClipSimilarity("pickscore", clip, tok, None)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (``sac+logos+ava1-l14-linearMSE``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)[:, 0]


class Aesthetic(nn.Module):
    """LAION aesthetic score of each image (prompt-free)."""

    differentiable = True

    def __init__(self, clip: nn.Module, head: AestheticHead):
        super().__init__()
        self.name, self.clip, self.head = "aesthetic", clip.requires_grad_(False), head.eval()
        self.head.requires_grad_(False)

    def forward(self, x0: torch.Tensor, **_) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        emb = _features(self.clip.get_image_features(pixel_values=clip_pixels(x0, size)))
        return self.head(F.normalize(emb, dim=-1))


def load_aesthetic_head(head, dim: int) -> AestheticHead:
    """The head from a module, a ``.safetensors`` file or the original ``.pth`` (read with
    ``weights_only=True``: a plain state dict, never an arbitrary pickle)."""
    if isinstance(head, AestheticHead):
        return head
    path = Path(head)
    if not path.exists():
        raise missing_weights("aesthetic", str(path), "Get sac+logos+ava1-l14-linearMSE.pth "
                              "from the LAION improved-aesthetic-predictor repository and pass "
                              "head=PATH.")
    state = read_state_dict(path, "aesthetic head")
    out = AestheticHead(dim)
    try:
        out.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"aesthetic head {path} does not fit a linear head on {dim} features "
                         f"({str(e).splitlines()[-1].strip()[:160]})") from None
    return out


@register("aesthetic")
def make_aesthetic(model="openai/clip-vit-large-patch14",
                   head="sac+logos+ava1-l14-linearMSE.pth"):
    clip, _tok = load_clip("aesthetic", model, processor=False)
    return Aesthetic(clip, load_aesthetic_head(head, clip.config.projection_dim))
