"""The shipped digits weights: what `dblend demo` relies on, checked on fixed seeds, sampled
through the one dispatcher (``run_method``) as every command does."""

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains.digits import PAIR, SPEC, DigitsDomain
from diffusion_blend.domains.images import load_classifier, normalised_rewards
from diffusion_blend.evaluation.images_demo import cross_rewards
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.sampling import sample

pytestmark = pytest.mark.slow

SEEDS = list(range(500, 620))
CLASSES = torch.arange(10).repeat(12)   # seed s draws digit s % 10
EXPERTS, DIGIT_REWARDS = tuple(SPEC.finetuned), SPEC.rewards
AGREEMENT = 0.9  # the judge classifier must recognise the prompted digit this often


def _on(*pairs) -> Preference:
    """A preference over EXPERTS from ``(name, weight)`` pairs (the rest zero)."""
    w = dict(pairs)
    return Preference(tuple(float(w.get(n, 0.0)) for n in EXPERTS), 1.0)


@pytest.fixture(scope="module")
def dom():
    return DigitsDomain(EXPERTS)


def _x0(dom, method, pref, seeds=SEEDS):
    return run_method(method, dom, pref, seeds).x0


@pytest.fixture(scope="module")
def samples(dom):
    out = {"base": _x0(dom, "pretrained", _on(("ink", 1)))}
    for name in EXPERTS:
        out[name] = _x0(dom, "db-mpa", _on((name, 1)))
    out["mpa"] = _x0(dom, "db-mpa", _on(("ink", 0.5), ("symmetry", 0.5)))
    return out


def _reward(dom, name):
    return dom.reward_fns[dom.names.index(name)]


def test_the_domain_gives_each_seed_its_digit(dom):
    assert torch.equal(dom.cond(SEEDS)["y"], CLASSES)


def test_base_generates_the_prompted_digit(samples):
    judge = load_classifier(SPEC, "judge")
    with torch.no_grad():
        agree = (judge(samples["base"]).argmax(1) == CLASSES).float().mean()
    assert agree >= AGREEMENT


@pytest.mark.parametrize("name", EXPERTS)
def test_each_expert_raises_its_own_reward(dom, samples, name):
    r = _reward(dom, name)
    diff = (r(samples[name], y=CLASSES) - r(samples["base"], y=CLASSES)).double()
    se = diff.std() / len(diff) ** 0.5
    assert diff.mean() > 3 * se  # paired on the same seeds


def test_interior_blend_lands_between_the_experts(dom, samples):
    for name in ("ink", "symmetry"):
        r = _reward(dom, name)
        vals = {k: r(samples[k], y=CLASSES).double() for k in ("ink", "symmetry", "mpa")}
        se = max(v.std() / len(v) ** 0.5 for v in vals.values())
        lo = min(vals["ink"].mean(), vals["symmetry"].mean()) - 2 * se
        hi = max(vals["ink"].mean(), vals["symmetry"].mean()) + 2 * se
        assert lo <= vals["mpa"].mean() <= hi


def test_lam_zero_is_the_base_and_unit_w_is_the_expert_exactly(dom, samples):
    seeds = SEEDS[:20]
    lam0 = Preference(_on(("ink", 0.4), ("symmetry", 0.6)).w, 0.0)
    assert torch.equal(_x0(dom, "db-mpa", lam0, seeds), _x0(dom, "pretrained", lam0, seeds))
    e2 = _x0(dom, "db-mpa", _on(("symmetry", 1)), seeds)
    alone = sample(dom.experts[EXPERTS.index("symmetry")], dom.schedule, seeds, dom.shape,
                   dom.steps, cond=dom.cond(seeds)).x0
    assert torch.equal(e2, alone)
    # the same seeds in a larger batch: the same noise; the network's float arithmetic may
    # differ in the last bits with the batch size (BLAS blocking), nothing more
    assert torch.allclose(e2, samples["symmetry"][:20], atol=1e-4)


def test_two_reward_pairs_conflict_and_the_pair_trades_off(dom, samples):
    """The experts' cross-rewards: at least two (expert, other reward) pairs where the expert
    lowers the other reward below the base's, beyond a paired 95% CI; the smooth expert lowers
    ink, and each expert of the pair beats the other on its own reward (paired): a trade-off.
    (On the 10-step chain ink lowered smooth too; on the 40-step one it no longer does.)"""
    scorers = normalised_rewards(DIGIT_REWARDS, dom.stats, dom.classifier)

    def values(x0):
        return torch.stack([r(x0, y=CLASSES) for r in scorers], 1)

    vals = {"pretrained": values(samples["base"])}
    vals |= {f"expert:{n}": values(samples[n]) for n in EXPERTS}
    cross = cross_rewards(vals, DIGIT_REWARDS)
    pairs = {(c["expert"], c["lowers"]) for c in cross["conflicts"]}
    assert len(pairs) >= 2, cross["delta"]
    assert ("smooth", "ink") in pairs
    for mine, other in (PAIR, PAIR[::-1]):
        col = DIGIT_REWARDS.index(mine)
        diff = (vals[f"expert:{mine}"] - vals[f"expert:{other}"])[:, col].double()
        assert diff.mean() - 1.96 * diff.std() / len(diff) ** 0.5 > 0, (mine, other)
    for c in cross["conflicts"]:  # each is a real drop, recomputed here
        col = DIGIT_REWARDS.index(c["lowers"])
        diff = (vals[f"expert:{c['expert']}"] - vals["pretrained"])[:, col]
        assert diff.double().mean() + 1.96 * diff.double().std() / len(diff) ** 0.5 < 0


