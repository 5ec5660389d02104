"""The one dispatcher on the exact testbed: every method of the vocabulary through
``run_sample``, unavailable methods refused, SMC outputs keyed by their own seed."""

import pytest
import torch

from diffusion_blend.domains.toy2d import Toy2dDomain
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import METHODS, MethodConfig, run_method
from diffusion_blend.evaluation.sample import SampleConfig, run_sample

STEPS = 20


@pytest.fixture(scope="module")
def domain():
    return Toy2dDomain("bimodal", STEPS)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("amortised", "conditioned-rl")])
def test_every_method_samples_and_reports_against_the_target(domain, method):
    summary, x0 = run_sample(domain, SampleConfig(method, (0.3, 0.7), 0.8, n=8),
                             MethodConfig(smc_particles=4))
    assert x0.shape == (8, 2) and bool(torch.isfinite(x0).all())
    assert summary["reward_names"] == ["r1", "r2"] and len(summary["mean_rewards"]) == 2
    assert {"target_mean_rewards", "target_log_z", "energy_distance"} <= summary.keys()
    per_step = {"pretrained": 1, "db-mpa": 3, "db-kla": 3, "db-mpa-ls": 1, "soup": 1,
                "morl": 1, "exact": 0}
    if method in per_step:
        assert summary["nfe_per_sample"] == per_step[method] * STEPS


@pytest.mark.parametrize("method", ["amortised", "conditioned-rl"])
def test_a_method_the_domain_lacks_is_refused(domain, method):
    assert run_method(method, domain, SampleConfig().preference(2), [0, 1]) is None
    with pytest.raises(UsageError, match="not available on toy2d"):
        run_sample(domain, SampleConfig(method, n=2))
    with pytest.raises(UsageError, match="--method 'blend' is not known"):
        SampleConfig("blend")


def test_unit_w_is_the_expert_and_the_oracle_exactly(domain):
    pref = SampleConfig(w=(1.0, 0.0)).preference(2)
    seeds = list(range(6))
    mpa, morl = (run_method(m, domain, pref, seeds).x0 for m in ("db-mpa", "morl"))
    assert torch.equal(mpa, morl)   # the exact expert is the exact tilted target's denoiser


def test_smc_outputs_do_not_depend_on_the_batch(domain):
    mcfg = MethodConfig(smc_particles=8)
    _, four = run_sample(domain, SampleConfig("smc", (0.5, 0.5), n=4, seed=10), mcfg)
    _, two = run_sample(domain, SampleConfig("smc", (0.5, 0.5), n=2, seed=12), mcfg)
    assert torch.equal(four[2:], two)
