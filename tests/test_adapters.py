import pytest
import torch
from torch import nn

from diffusion_blend.adapters import (
    AdapterView,
    LoraSoup,
    adapter_names,
    adapter_state,
    add_lora,
    load_adapter_state,
    merged_copy,
)
from diffusion_blend.errors import UsageError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x, t, **_):
        return self.out(torch.tanh(self.inp(x) + t[:, None].float() / 100))


def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_adapters_share_one_base_and_switch_exactly():
    torch.manual_seed(0)
    model = Tiny().requires_grad_(False)
    x, t = torch.randn(5, 3), torch.full((5,), 7)
    before = model(x, t)
    add_lora(model, "a", 2, ["inp", "out"], seed=0)
    add_lora(model, "b", 2, ["inp", "out"], seed=1)
    assert adapter_names(model) == ["a", "b"]
    base, va, vb = AdapterView(model, None), AdapterView(model, "a"), AdapterView(model, "b")
    assert torch.equal(base(x, t), before) and torch.allclose(va(x, t), before)  # B = 0
    _perturb(model, "a", 0)
    _perturb(model, "b", 1)
    ya, yb = va(x, t), vb(x, t)
    assert not torch.allclose(ya, yb) and torch.equal(base(x, t), before)
    load_adapter_state(model, "b", adapter_state(model, "a"))
    assert torch.allclose(vb(x, t), ya)


def test_lora_targets_that_do_not_exist():
    with pytest.raises(UsageError, match="do not fit"):
        add_lora(Tiny(), "a", 2, ["no_such_layer"])


def test_merged_copy_equals_the_adapter_view_and_drops_lora_wrappers():
    torch.manual_seed(0)
    model = Tiny().requires_grad_(False)
    add_lora(model, "a", 2, ["inp", "out"], seed=0)
    add_lora(model, "b", 2, ["inp", "out"], seed=1)
    _perturb(model, "a", 0)
    x, t = torch.randn(4, 3), torch.full((4,), 5)
    merged = merged_copy(model, "a")
    assert torch.allclose(merged(x, t), AdapterView(model, "a")(x, t), atol=1e-6)
    assert type(merged.inp) is torch.nn.Linear    # a plain network: one model's cost
    plain = merged_copy(model, None)
    assert torch.equal(plain(x, t), AdapterView(model, None)(x, t))   # the base, bit for bit
    _perturb(model, "b", 1)
    soup = merged_copy(model, soup=[("a", 0.3), ("b", -0.5)])
    assert torch.allclose(soup(x, t), LoraSoup(model, ["a", "b"], [0.3, -0.5])(x, t), atol=1e-6)
    vertex = merged_copy(model, soup=[("a", 1.0), ("b", 0.0)])
    assert torch.equal(vertex(x, t), merged_copy(model, "a")(x, t))
