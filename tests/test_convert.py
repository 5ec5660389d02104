"""Legacy LoRA import: a synthetic file in the diffusers 0.14 attention-processor layout."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention

from diffusion_blend.convert import convert_lora
from diffusion_blend.errors import UsageError
from tests.tiny_sd import tiny_sd_pipeline


def old_state(unet, rank=2, seed=0) -> dict:
    """What ``unet.save_attn_procs`` wrote with LoRACrossAttnProcessor (diffusers 0.14)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, Attention):
            continue
        for proj, layer in (("to_q", mod.to_q), ("to_k", mod.to_k), ("to_v", mod.to_v),
                            ("to_out", mod.to_out[0])):
            key = f"{name}.processor.{proj}_lora"
            out[f"{key}.down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.1
            out[f"{key}.up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    return out


def merged(unet, state):
    """The UNet with ``W + up @ down`` written into every attention projection."""
    unet = copy.deepcopy(unet)
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if isinstance(mod, Attention):
                for proj, layer in (("to_q", mod.to_q), ("to_k", mod.to_k), ("to_v", mod.to_v),
                                    ("to_out", mod.to_out[0])):
                    key = f"{name}.processor.{proj}_lora"
                    layer.weight += state[f"{key}.up.weight"] @ state[f"{key}.down.weight"]
    return unet


def test_converted_lora_loads_into_current_diffusers_and_acts_like_the_old_one(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    state = old_state(pipe.unet)
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "pytorch_lora_weights.bin")
    meta = convert_lora(tmp_path / "old", tmp_path / "new")
    assert meta["tensors"] == len(state) and meta["ranks"] == [2]
    reference = merged(pipe.unet, state)
    pipe.load_lora_weights(str(tmp_path / "new"), adapter_name="old")
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(400), torch.randn(2, 5, 32)
    with torch.no_grad():
        got = pipe.unet(x, t, encoder_hidden_states=ehs).sample
        want = reference(x, t, encoder_hidden_states=ehs).sample
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(UsageError, match="not empty"):
        convert_lora(tmp_path / "old", tmp_path / "new")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_never_executed_and_bad_layouts_are_refused(tmp_path):
    (tmp_path / "evil").mkdir()
    torch.save({"x": Evil()}, tmp_path / "evil" / "pytorch_lora_weights.bin")
    with pytest.raises(UsageError, match="not a readable state dict") as e:
        convert_lora(tmp_path / "evil", tmp_path / "out1")
    assert "weights_only=False" not in str(e.value)
    (tmp_path / "odd").mkdir()
    torch.save({"mid_block.weight": torch.zeros(2)}, tmp_path / "odd" / "pytorch_lora_weights.bin")
    with pytest.raises(UsageError, match="attention-processor"):
        convert_lora(tmp_path / "odd", tmp_path / "out2")
    with pytest.raises(UsageError, match="has no"):
        convert_lora(tmp_path / "missing", tmp_path / "out3")
    assert not any((tmp_path / d).exists() for d in ("out1", "out2", "out3"))
