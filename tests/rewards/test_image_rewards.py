"""Image reward models, tested on tiny randomly initialised models of the same architecture."""

import pytest
import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.rewards import get_reward
from diffusion_blend.rewards.images import AestheticHead, clip_pixels
from tests.tiny_sd import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _reference_logits(clip_dir, images, prompts):
    from transformers import CLIPModel

    from diffusion_blend.rewards.images import load_clip

    model = CLIPModel.from_pretrained(clip_dir).eval()
    _, tok = load_clip("x", clip_dir)
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, pixel_values=clip_pixels(images, 16))
    return out.logits_per_image.diagonal()


def test_pickscore_is_clips_logit_for_its_prompt_and_clip_score_is_100_cos(clip_dir):
    images, prompts = torch.rand(3, 3, 16, 16), ["a cat", "a dog", "an apple"]
    ref = _reference_logits(clip_dir, images, prompts)
    pick = get_reward("pickscore", model=clip_dir, processor=clip_dir)
    clip = get_reward("clip-score", model=clip_dir)
    with torch.no_grad():
        p, c = pick(images, prompt=prompts), clip(images, prompt=prompts)
    assert torch.allclose(p, ref, atol=1e-5)
    scale = float(pick.clip.logit_scale.exp())
    assert torch.allclose(c, ref * 100.0 / scale, atol=1e-4)


def test_clip_rewards_are_differentiable_in_the_image(clip_dir):
    x = torch.rand(2, 3, 24, 24, requires_grad=True)   # resized to 16 inside, in torch
    r = get_reward("clip-score", model=clip_dir)(x, prompt="a cat")
    (g,) = torch.autograd.grad(r.sum(), x)
    assert g.abs().sum() > 0 and r.shape == (2,)
    with pytest.raises(UsageError, match="needs the prompts"):
        get_reward("clip-score", model=clip_dir)(x)


def test_aesthetic_head_from_the_original_state_dict(clip_dir, tmp_path):
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.manual_seed(1)
    head = AestheticHead(32)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    r = get_reward("aesthetic", model=clip_dir, head=tmp_path / "head.pth")
    images = torch.rand(2, 3, 16, 16)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=clip_pixels(images, 16))
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        want = head.eval()(F.normalize(emb, dim=-1))
        assert torch.allclose(r(images), want, atol=1e-5)
    with pytest.raises(UsageError, match="sac\\+logos"):
        get_reward("aesthetic", model=clip_dir, head=tmp_path / "missing.pth")


def test_missing_weights_and_packages_are_named(tmp_path):
    with pytest.raises(UsageError, match="clip-vit-large-patch14.*huggingface-cli download"):
        get_reward("clip-score", model="openai/clip-vit-large-patch14")
    with pytest.raises(UsageError, match="no-such-dir"):
        get_reward("pickscore", model=tmp_path / "no-such-dir")
    with pytest.raises(UsageError, match="HPS_v2.1_compressed.pt.*huggingface-cli download"):
        get_reward("hpsv2", model=tmp_path / "missing")
    with pytest.raises(UsageError, match="ImageReward.pt.*huggingface-cli download"):
        get_reward("imagereward", model=tmp_path / "missing")
    with pytest.raises(UsageError, match="jpeg-compressibility"):
        get_reward("nope")


def test_jpeg_rewards_prefer_flat_or_busy_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    busy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    comp, incomp = get_reward("jpeg-compressibility"), get_reward("jpeg-incompressibility")
    x = torch.cat([flat, busy])
    assert comp(x)[0] > comp(x)[1] and incomp(x)[1] > incomp(x)[0]
    assert torch.equal(comp(x), -incomp(x)) and not comp.differentiable
    with pytest.raises(UsageError, match="\\[B, 3, H, W\\]"):
        comp(torch.rand(1, 1, 8, 8))


def _bad_checkpoints(tmp_path):
    """Garbage, a pickle that would run code, a dict of the wrong keys, a list of tensors."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    files = {"garbage": b"\x00not a checkpoint\xff", "pickle": pickle.dumps({"x": Evil()})}
    for name, raw in files.items():
        (tmp_path / f"{name}.pt").write_bytes(raw)
    torch.save({"unrelated.weight": torch.zeros(2, 2)}, tmp_path / "wrong-keys.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    return [tmp_path / f"{n}.pt" for n in ("garbage", "pickle", "wrong-keys", "list")]


@pytest.mark.parametrize("reward", ["imagereward", "hpsv2", "aesthetic"])
def test_corrupt_reward_checkpoints_are_usage_errors(tmp_path, clip_dir, reward):
    for path in _bad_checkpoints(tmp_path):
        kwargs = {"aesthetic": {"model": clip_dir, "head": path},
                  "hpsv2": {"model": path, "tokenizer": clip_dir},
                  "imagereward": {"model": path, "tokenizer": clip_dir}}[reward]
        with pytest.raises(UsageError) as e:
            get_reward(reward, **kwargs)
        assert str(path) in str(e.value) and "weights_only=False" not in str(e.value)


def test_reward_factories_refuse_unknown_arguments(clip_dir):
    with pytest.raises(UsageError, match="takes no argument 'model'"):
        get_reward("jpeg-compressibility", model="x")
    with pytest.raises(UsageError, match="takes no argument 'heads'"):
        get_reward("clip-score", model=clip_dir, heads=3)
