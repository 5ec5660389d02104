import pytest
import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.rewards import WeightedSum, get_reward
from diffusion_blend.rewards.grey import class_margin, crisp, ink, symmetry


def test_pixel_rewards_on_known_images():
    white, black = torch.ones(1, 1, 8, 8), -torch.ones(1, 1, 8, 8)
    grey = torch.zeros(1, 1, 8, 8)
    left = black.clone()
    left[..., :4] = 1.0  # left half white
    assert ink(white).item() == 1.0 and ink(black).item() == 0.0 and ink(grey).item() == 0.5
    assert crisp(white).item() == 1.0 and crisp(grey).item() == 0.0
    assert symmetry(white).item() == 0.0 and symmetry(left).item() == -1.0


class Fixed(torch.nn.Module):
    def forward(self, x):
        return torch.tensor([[3.0, 1.0, 0.5] + [0.0] * 7]).expand(x.shape[0], 10)


def test_class_margin():
    fn = class_margin(Fixed())
    x = torch.zeros(2, 1, 8, 8)
    assert fn(x, y=torch.tensor([0, 1])).tolist() == [2.0, -2.0]
    with pytest.raises(UsageError, match="needs the prompted class"):
        fn(x)


def test_class_logprob_is_the_prompted_class_log_probability():
    """``log p(y | x0)``: the closed form of the fixed logits; its gradient pushes the prompted
    logit up and every other one down (the margin's moves only the strongest competitor)."""
    logits = torch.tensor([3.0, 1.0, 0.5] + [0.0] * 7)
    norm = torch.log(torch.exp(logits).sum())
    r = get_reward("class-logprob", classifier=Fixed())
    x = torch.zeros(2, 1, 8, 8)
    got = r(x, y=torch.tensor([0, 2]))
    assert torch.allclose(got, torch.stack([3.0 - norm, 0.5 - norm]))
    leaf = torch.randn(10, requires_grad=True)

    class Given(torch.nn.Module):
        def forward(self, x):
            return leaf.expand(x.shape[0], 10)

    r = get_reward("class-logprob", classifier=Given())
    g = torch.autograd.grad(r(torch.zeros(1, 1, 8, 8), y=[4]).sum(), leaf)[0]
    assert g[4] > 0 and bool((torch.cat([g[:4], g[5:]]) < 0).all())


def test_registry_and_normalisation():
    r = get_reward("ink", scale=0.5, shift=0.25)
    assert r(torch.ones(1, 1, 8, 8)).item() == 1.5
    with pytest.raises(UsageError, match="known rewards"):
        get_reward("beauty")
    ws = WeightedSum([get_reward("ink"), get_reward("crisp")], [0.25, 0.75])
    x = torch.zeros(3, 1, 8, 8)
    assert torch.allclose(ws(x), 0.25 * ink(x) + 0.75 * crisp(x))
    assert ws.differentiable
