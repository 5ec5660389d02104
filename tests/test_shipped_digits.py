"""The shipped digits weights: what `dblend demo` relies on, checked on fixed seeds."""

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains import digits
from diffusion_blend.evaluation.digits_demo import EXPERTS, DigitsModels, cross_rewards
from diffusion_blend.rewards.digits import DIGIT_REWARDS

pytestmark = pytest.mark.slow

CLASSES = torch.arange(10).repeat(12)
SEEDS = list(range(500, 500 + len(CLASSES)))
AGREEMENT = 0.9  # the judge classifier must recognise the prompted digit this often


@pytest.fixture(scope="module")
def bench():
    return DigitsModels(list(EXPERTS))


@pytest.fixture(scope="module")
def samples(bench):
    out = {"base": bench.render(bench.base, CLASSES, SEEDS)[0]}
    for name in EXPERTS:
        out[name] = bench.render(bench.expert(name), CLASSES, SEEDS)[0]
    out["mpa"] = bench.render(bench.blend(["ink", "symmetry"], Preference((0.5, 0.5))), CLASSES,
                              SEEDS)[0]
    return out


def _reward(bench, name):
    return next(r for r in bench.rewards if r.name == name)


def test_base_generates_the_prompted_digit(samples):
    judge = digits.load_classifier("judge")
    with torch.no_grad():
        agree = (judge(samples["base"]).argmax(1) == CLASSES).float().mean()
    assert agree >= AGREEMENT


@pytest.mark.parametrize("name", EXPERTS)
def test_each_expert_raises_its_own_reward(bench, samples, name):
    r = _reward(bench, name)
    diff = (r(samples[name], y=CLASSES) - r(samples["base"], y=CLASSES)).double()
    se = diff.std() / len(diff) ** 0.5
    assert diff.mean() > 3 * se  # paired on the same seeds


def test_interior_blend_lands_between_the_experts(bench, samples):
    for name in ("ink", "symmetry"):
        r = _reward(bench, name)
        vals = {k: r(samples[k], y=CLASSES).double() for k in ("ink", "symmetry", "mpa")}
        se = max(v.std() / len(v) ** 0.5 for v in vals.values())
        lo = min(vals["ink"].mean(), vals["symmetry"].mean()) - 2 * se
        hi = max(vals["ink"].mean(), vals["symmetry"].mean()) + 2 * se
        assert lo <= vals["mpa"].mean() <= hi


def test_lam_zero_is_the_base_and_unit_w_is_the_expert_exactly(bench, samples):
    seeds, classes = SEEDS[:20], CLASSES[:20]
    lam0 = bench.render(bench.blend(["ink", "symmetry"], Preference((0.4, 0.6), 0.0)), classes,
                        seeds)[0]
    assert torch.equal(lam0, bench.render(bench.base, classes, seeds)[0])
    e2 = bench.render(bench.blend(["ink", "symmetry"], Preference((0.0, 1.0))), classes,
                      seeds)[0]
    assert torch.equal(e2, bench.render(bench.expert("symmetry"), classes, seeds)[0])
    # the same seeds in a larger batch: the same noise; the network's float arithmetic may
    # differ in the last bits with the batch size (BLAS blocking), nothing more
    assert torch.allclose(e2, samples["symmetry"][:20], atol=1e-4)


def test_two_reward_pairs_conflict(bench, samples):
    """The experts' cross-rewards: at least two (expert, other reward) pairs where the expert
    lowers the other reward below the base's, beyond a paired 95% CI."""
    vals = {"pretrained": bench.values(samples["base"], CLASSES)}
    vals |= {f"expert:{n}": bench.values(samples[n], CLASSES) for n in EXPERTS}
    cross = cross_rewards(vals)
    pairs = {(c["expert"], c["lowers"]) for c in cross["conflicts"]}
    assert len(pairs) >= 2, cross["delta"]
    assert ("ink", "smooth") in pairs and ("smooth", "ink") in pairs  # a two-way trade-off
    for c in cross["conflicts"]:  # each is a real drop, recomputed here
        col = DIGIT_REWARDS.index(c["lowers"])
        diff = (vals[f"expert:{c['expert']}"] - vals["pretrained"])[:, col]
        assert diff.double().mean() + 1.96 * diff.double().std() / len(diff) ** 0.5 < 0


def test_the_shipped_amortised_blend_tracks_db_mpa_with_one_nfe_per_step(bench):
    """Over the w grid its r_w stays within 5% of the range of DB-MPA's r_w (paired seeds)."""
    from diffusion_blend.domains.digits import PAIR
    from diffusion_blend.finetune.distill_digits import load_amortised

    amortised = load_amortised()
    rewards = [_reward(bench, n) for n in PAIR]
    ours, blend = [], []
    for w1 in (0.0, 0.25, 0.5, 0.75, 1.0):
        pref = Preference((w1, 1.0 - w1))
        amortised.preference = pref
        x_a, nfe = bench.render(amortised, CLASSES, SEEDS)
        x_b, _ = bench.render(bench.blend(list(PAIR), pref), CLASSES, SEEDS)
        assert nfe == 10   # one network evaluation per step
        for x, acc in ((x_a, ours), (x_b, blend)):
            acc.append(float(sum(wi * r(x, y=CLASSES) for wi, r in
                                 zip(pref.w, rewards, strict=True)).mean()))
    span = max(blend) - min(blend)
    assert span > 0.5 and all(abs(a - b) <= 0.05 * span for a, b in zip(ours, blend, strict=True))
