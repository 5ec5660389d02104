"""The shipped fashion weights: what `dblend demo` (fashion by default) relies on, checked on
fixed seeds held out from training, sampled through the one dispatcher (``run_method``)."""

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains.fashion import SPEC, FashionDomain
from diffusion_blend.domains.images import load_classifier, normalised_rewards
from diffusion_blend.evaluation.images_demo import cross_rewards, run_demo
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.io import read_json

pytestmark = pytest.mark.slow

SEEDS = list(range(700, 900))
CLASSES = torch.arange(10).repeat(20)   # seed s draws class s % 10
EXPERTS = tuple(SPEC.finetuned)
AGREEMENT = 0.9   # the held-out judge must read the prompted class this often
MIN_PATH_KL = 3.0  # every expert moves the base this far (nats over the chain)


def _on(name: str) -> Preference:
    return Preference(tuple(float(n == name) for n in EXPERTS))


@pytest.fixture(scope="module")
def dom():
    return FashionDomain(EXPERTS)


@pytest.fixture(scope="module")
def samples(dom):
    out = {"base": run_method("pretrained", dom, _on(EXPERTS[0]), SEEDS).x0}
    out |= {n: run_method("db-mpa", dom, _on(n), SEEDS).x0 for n in EXPERTS}
    return out


def test_the_shipped_weights_fit_the_budget():
    files = [p for p in SPEC.weights_dir.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20


@pytest.mark.parametrize("name", ["base", *EXPERTS])
def test_the_judge_reads_the_prompted_class(samples, name):
    judge = load_classifier(SPEC, "judge")
    with torch.no_grad():
        agree = (judge(samples[name]).argmax(1) == CLASSES).float().mean()
    assert agree >= AGREEMENT, (name, float(agree))


@pytest.mark.parametrize("name", EXPERTS)
def test_each_expert_moves_the_base_and_raises_its_reward(dom, samples, name):
    meta = read_json(SPEC.weights_dir / "experts" / f"{name}.json")
    assert meta["eval"]["path_kl"] >= MIN_PATH_KL and meta["config"]["stop"] == "plateau"
    r = dom.reward_fns[dom.names.index(name)]
    diff = (r(samples[name], y=CLASSES) - r(samples["base"], y=CLASSES)).double()
    assert diff.mean() > 3 * diff.std() / len(diff) ** 0.5   # paired on the same seeds


def test_the_pair_conflicts_both_ways(dom, samples):
    scorers = normalised_rewards(SPEC.rewards, dom.stats, dom.classifier)

    def values(x0):
        return torch.stack([r(x0, y=CLASSES) for r in scorers], 1)

    vals = {"pretrained": values(samples["base"])}
    vals |= {f"expert:{n}": values(samples[n]) for n in EXPERTS}
    pairs = {(c["expert"], c["lowers"]) for c in cross_rewards(vals, SPEC.rewards)["conflicts"]}
    a, b = SPEC.pair
    assert (a, b) in pairs and (b, a) in pairs


def test_the_demo_writes_its_report_and_grids(tmp_path):
    out = run_demo("fashion", tmp_path / "demo", n_per_class=1, progress=False)
    assert {"report.md", "grid_mpa.png", "grid_kla.png", "pareto.png"} <= {
        p.name for p in out.iterdir()}
    report = (out / "report.md").read_text()
    assert "fashion demo" in report and "Conflicts" in report and "morl:0.5" in report
