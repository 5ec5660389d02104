import math

import pytest
import torch

from diffusion_blend.blend import (
    BlendedDenoiser,
    Guided,
    Preference,
    PreferenceError,
    StochasticBlend,
)
from diffusion_blend.sampling import to_eps


class Affine:
    """A tiny 'network': eps = A x + b(t) + cond shift, counting its calls."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(3, 3, generator=g)
        self.b = torch.randn(3, generator=g)
        self.calls = 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        shift = 0.0 if y is None else y[:, None].float()
        return x @ self.A + self.b * t[:, None].float() / 100 + shift


@pytest.fixture
def nets():
    return Affine(0), [Affine(1), Affine(2)]


def _xt(b=5):
    return torch.randn(b, 3, generator=torch.Generator().manual_seed(9)), torch.full((b,), 40)


def test_blend_formula(nets):
    base, experts = nets
    x, t = _xt()
    pref = Preference((0.3, 0.5), lam=0.8)
    got = BlendedDenoiser(base, experts, pref)(x, t)
    e0, e1, e2 = base(x, t), experts[0](x, t), experts[1](x, t)
    want = e0 + 0.8 * (0.3 * (e1 - e0) + 0.5 * (e2 - e0))
    assert torch.allclose(got, want, atol=1e-5)


def test_lam_zero_is_base_and_unit_vector_is_expert(nets):
    base, experts = nets
    x, t = _xt()
    lam0 = BlendedDenoiser(base, experts, Preference((0.4, 0.6), 0.0))
    assert torch.equal(lam0(x, t), base(x, t))
    for i in range(2):
        w = tuple(1.0 if j == i else 0.0 for j in range(2))
        assert torch.equal(BlendedDenoiser(base, experts, Preference(w))(x, t), experts[i](x, t))


def test_base_skipped_when_weights_sum_to_one_in_float(nets):
    base, experts3 = Affine(0), [Affine(1), Affine(2), Affine(3)]
    w = (0.7, 0.2, 0.1)
    assert sum(w) != 1.0  # 0.9999999999999999: exact comparison would evaluate the base
    blend = BlendedDenoiser(base, experts3, Preference(w))
    x, t = _xt()
    blend(x, t)
    assert base.calls == 0 and blend.nfe == 3
    assert BlendedDenoiser(None, experts3, Preference(w))(x, t).shape == x.shape
    with pytest.raises(PreferenceError, match="needs the pretrained model"):
        BlendedDenoiser(None, experts3, Preference(w, 0.5))


def test_preference_change_without_rebuild(nets):
    base, experts = nets
    x, t = _xt()
    blend = BlendedDenoiser(base, experts, Preference((1.0, 0.0)))
    before = blend(x, t)
    blend.preference = Preference((0.0, 1.0))
    assert torch.equal(blend(x, t), experts[1](x, t)) and not torch.equal(before, blend(x, t))
    with pytest.raises(PreferenceError, match="3 weights"):
        blend.preference = Preference((0.2, 0.3, 0.5))


def test_guidance_commutes_with_blend(nets):
    base, experts = nets
    x, t = _xt()
    y, null = {"y": torch.arange(5)}, {"y": torch.zeros(5)}
    pref = Preference((0.25, 0.5), 0.9)
    blend_of_guided = BlendedDenoiser(Guided(base, 7.5, null), [Guided(e, 7.5, null)
                                                               for e in experts], pref)
    guided_blend = Guided(BlendedDenoiser(base, experts, pref), 7.5, null)
    assert torch.allclose(blend_of_guided(x, t, **y), guided_blend(x, t, **y), atol=1e-4)
    assert blend_of_guided.nfe == 6


def test_blend_is_prediction_type_agnostic(nets):
    """Blending v predictions then converting equals converting then blending (affine)."""
    base, experts = nets
    x, t = _xt()
    pref, abar = Preference((0.6, 0.4), 0.7), 0.37
    v_blend = BlendedDenoiser(base, experts, pref)(x, t)
    eps_nets = [lambda x, t, d=d: to_eps(d(x, t), x, abar, "v") for d in [base, *experts]]
    eps_blend = BlendedDenoiser(eps_nets[0], eps_nets[1:], pref)(x, t)
    assert torch.allclose(to_eps(v_blend, x, abar, "v"), eps_blend, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"w": ()}, "empty"),
    ({"w": (0.5, float("nan"))}, "finite"),
    ({"w": (0.5, 0.5), "lam": float("inf")}, "lam"),
    ({"w": (0.5, 0.5), "lam": -0.1}, "lam"),
    ({"w": (-0.5, 1.5)}, "negative"),
    ({"w": (0.5, 0.5), "lam": 1.5}, "extrapolat"),
])
def test_bad_preferences(kwargs, match):
    with pytest.raises(PreferenceError, match=match):
        Preference(**kwargs)


def test_extrapolation_when_asked():
    p = Preference((-0.5, 1.5), lam=2.0, allow_extrapolation=True)
    c_pre, c = p.coefficients()
    assert math.isclose(c_pre + sum(c), 1.0)


def test_stochastic_blend_frequencies_and_batch_invariance():
    picks = []
    experts = [lambda x, t, i=i: torch.full_like(x, float(i)) for i in range(3)]
    w = (0.2, 0.3, 0.5)
    n, T = 4000, 5
    ls = StochasticBlend(experts, w, list(range(n)), T)
    x = torch.zeros(n, 1)
    for t in range(T):
        picks.append(ls(x, torch.full((n,), t))[:, 0])
    picks = torch.cat(picks)
    for i, wi in enumerate(w):
        freq = float((picks == i).double().mean())
        assert abs(freq - wi) <= 4 * math.sqrt(wi * (1 - wi) / len(picks))
    sub = StochasticBlend(experts, w, [7, 8, 9], T)
    full_rows = ls(torch.zeros(n, 1), torch.full((n,), 3))[7:10]
    assert torch.equal(sub(torch.zeros(3, 1), torch.full((3,), 3)), full_rows)
    assert ls.nfe == 1.0
    with pytest.raises(PreferenceError, match="simplex"):
        StochasticBlend(experts, (0.5, 0.6, -0.1), [0], T)


def test_weights_summing_above_one_are_extrapolation():
    for w, lam in (((0.8, 0.8), 1.0), ((5.0, 5.0), 1.0), ((0.6, 0.6), 0.9)):
        with pytest.raises(PreferenceError, match="lam \\* sum\\(w\\)"):
            Preference(w, lam)
        c_pre, _ = Preference(w, lam, allow_extrapolation=True).coefficients()
        assert c_pre < 0
    assert Preference((0.6, 0.6), 0.8).coefficients()[0] == pytest.approx(0.04)
