"""The amortised blend: its pieces on tiny models, the recipe, and the shipped adapter."""

import pytest
import torch

from diffusion_blend.amortised import (
    AmortisedDenoiser,
    PrefEmbedding,
    coefficients,
    per_row_blend,
    sample_preferences,
)
from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.errors import UsageError


class TinyTime(torch.nn.Module):
    """A denoiser with a time-embedding module the preference MLP can add to."""

    def __init__(self):
        super().__init__()
        self.time_embedding = torch.nn.Linear(1, 16)
        self.inp, self.out = torch.nn.Linear(3, 16), torch.nn.Linear(16, 3)

    def forward(self, x, t, **_):
        temb = self.time_embedding(t[:, None].float() / 1000)
        return self.out(torch.tanh(self.inp(x) + temb))


def test_untrained_amortised_model_is_the_base_and_conditioning_moves_it():
    torch.manual_seed(0)
    net = TinyTime().requires_grad_(False)
    emb = PrefEmbedding(2, 16)
    den = AmortisedDenoiser(net, emb, net.time_embedding, Preference((0.3, 0.7), 1.5, True))
    x, t = torch.randn(4, 3), torch.full((4,), 5)
    assert torch.equal(den(x, t), net(x, t)) and den.nfe == 1.0 and emb.current is None
    torch.nn.init.normal_(emb.net[-1].weight)
    moved = den(x, t)
    den.preference = Preference((0.7, 0.3), 1.5, True)
    assert not torch.allclose(moved, net(x, t)) and not torch.allclose(moved, den(x, t))


def test_per_row_blend_matches_the_blended_denoiser_row_by_row():
    torch.manual_seed(0)
    base, e1, e2 = TinyTime(), TinyTime(), TinyTime()
    x, t = torch.randn(3, 3), torch.full((3,), 7)
    prefs = [Preference((0.2, 0.8)), Preference((1.0, 0.0), 0.5), Preference((0.5, 0.5), 2.0,
                                                                              True)]
    feats = coefficients(torch.tensor([p.w for p in prefs]), torch.tensor([p.lam for p in prefs]))
    rows = per_row_blend(base, [e1, e2], x, t, {}, feats)
    for i, p in enumerate(prefs):
        want = BlendedDenoiser(base, [e1, e2], p)(x[i:i + 1], t[i:i + 1])
        assert torch.allclose(rows[i:i + 1], want, atol=1e-6)


def test_preferences_lie_on_the_simplex_and_in_the_lambda_range():
    w, lam = sample_preferences(torch.Generator().manual_seed(0), 500, 3, 2.0)
    assert torch.allclose(w.sum(1), torch.ones(500)) and (w >= 0).all()
    assert (lam >= 0).all() and (lam <= 2).all() and (w.max(1).values == 1).sum() > 50


@pytest.mark.slow
def test_distill_recipe_resumes_to_the_same_weights_and_the_loader_accepts_it(tmp_path):
    import json
    from dataclasses import replace

    from safetensors.torch import load_file

    from diffusion_blend.domains.digits import SPEC
    from diffusion_blend.domains.images import amortised_name, load_amortised
    from diffusion_blend.finetune.distill_images import DistillConfig, run_distill

    cfg, wd, NAME = (dict(batch_size=4, checkpoint_every=1, lr_schedule="constant"),
                     SPEC.weights_dir, amortised_name(SPEC))
    run_distill(replace(SPEC, steps=3), wd, tmp_path / "c", DistillConfig(iterations=1, **cfg),
                progress=False)
    meta = json.loads((tmp_path / "c" / f"{NAME}.json").read_text())
    assert meta["config"]["steps"] == 3     # distilled on the chain the domain samples
    run_distill(SPEC, wd, tmp_path / "a", DistillConfig(iterations=2, **cfg), progress=False)
    run_distill(SPEC, wd, tmp_path / "b", DistillConfig(iterations=1, **cfg), progress=False)
    latest = tmp_path / "b" / "checkpoints" / "latest.json"
    stamp = latest.stat().st_mtime_ns
    with pytest.raises(UsageError, match=r"config differs in \['lr'\]"):   # refused up front
        run_distill(SPEC, wd, tmp_path / "b", DistillConfig(iterations=2, lr=1e-3, **cfg),
                    resume=True, progress=False)
    assert latest.stat().st_mtime_ns == stamp
    # a constant rate may run on past the saved count: the same weights as one longer run
    run_distill(SPEC, wd, tmp_path / "b", DistillConfig(iterations=2, **cfg), resume=True,
                progress=False)
    a = load_file(tmp_path / "a" / f"{NAME}.safetensors")
    b = load_file(tmp_path / "b" / f"{NAME}.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    den = load_amortised(SPEC, path=tmp_path / "a" / f"{NAME}.safetensors")
    x = den(torch.randn(2, 1, 8, 8), torch.full((2,), 10), y=torch.tensor([1, 2]))
    assert x.shape == (2, 1, 8, 8) and den.nfe == 1.0


def test_a_preference_outside_the_training_range_is_refused():
    net = TinyTime()
    den = AmortisedDenoiser(net, PrefEmbedding(2, 16), net.time_embedding,
                            Preference((0.5, 0.5)), lam_max=2.0)
    den.preference = Preference((0.2, 0.8), 1.8, allow_extrapolation=True)   # inside
    for bad in (Preference((0.2, 0.8), 2.5, True), Preference((0.2, 0.5)),
                Preference((-0.2, 1.2), 1.0, True)):
        with pytest.raises(UsageError, match="outside"):
            den.preference = bad
    AmortisedDenoiser(net, PrefEmbedding(2, 16), net.time_embedding,
                      Preference((0.2, 0.5)), lam_max=2.0, allow_extrapolation=True)

