"""The SMC-corrected blend: exact weights, an exact proposal, and the Jensen gap removed."""

import math

import pytest
import torch

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.domains.toy2d import Toy2dDomain, load_problem, parse_spec
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.methods import MethodConfig
from diffusion_blend.evaluation.sample import SampleConfig, run_sample
from diffusion_blend.sampling import ddpm_step, gaussian_logprob
from diffusion_blend.smc import smc_sample
from tests.conftest import z_ok

ONE_D = {"mixture": {"weights": [0.4, 0.6], "means": [[-1.0], [1.5]], "covs": [[[0.3]], [[0.2]]]},
         "rewards": [{"type": "linear", "a": [1.0]},
                     {"type": "quadratic", "c": [0.5], "Q": [[1.0]]}],
         "alpha": 1.0, "schedule": {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02}}


def _setup(problem, pref):
    base = problem.base_denoiser()
    experts = [problem.expert_denoiser(i) for i in range(problem.k)]
    coef = torch.tensor(pref.w, dtype=torch.float64) * pref.lam / problem.alpha
    return BlendedDenoiser(base, experts, pref), base, lambda x0, **_: (
        problem.rewards_of(x0.double()) @ coef)


def test_weights_equal_the_brute_force_path_density_ratio():
    """Without resampling, each final weight is p_pre(path) exp(lam r_w(x0)/alpha) / q(path)."""
    problem = parse_spec(ONE_D)
    pref = Preference((0.3, 0.7), 1.5, allow_extrapolation=True)
    proposal, base, pot = _setup(problem, pref)
    steps, p = 4, 8
    res = smc_sample(proposal, base, pot, problem.schedule, list(range(3)), (1,), steps, p,
                     ess_threshold=0.0, record=True)
    pairs = problem.schedule.transitions(steps)
    log_ratio = torch.zeros(3 * p, dtype=torch.float64)
    for k, (t, a_t, a_s) in enumerate(pairs[:-1]):
        x, x_next = res.paths[k], res.paths[k + 1]
        tt = torch.full((3 * p,), t)
        m_p, var = ddpm_step(base(x, tt), x, a_t, a_s)
        m_q, _ = ddpm_step(proposal(x, tt), x, a_t, a_s)
        log_ratio += (gaussian_logprob(x_next, m_p, var)
                      - gaussian_logprob(x_next, m_q, var)).double()
    t, a_t, a_s = pairs[-1]
    x1 = res.paths[-2]
    x0 = ddpm_step(base(x1, torch.full((3 * p,), t)), x1, a_t, a_s)[0]   # pretrained last map
    assert torch.allclose(x0, res.x0)
    unnorm = (log_ratio + pot(x0)).reshape(3, p)
    want = unnorm - torch.logsumexp(unnorm, 1, keepdim=True)
    assert torch.allclose(res.log_weights, want, atol=1e-6)
    assert torch.allclose(res.log_z, torch.logsumexp(unnorm, 1) - math.log(p), atol=1e-6)


def test_an_exact_expert_as_proposal_leaves_the_weights_nearly_equal():
    """w = e_1, lam = 1 with the exact expert: the proposal is the target (up to the 1000-step
    discretisation), so every weight is ~1/P (a wrong weight formula spreads them widely)."""
    problem = load_problem("gaussian")
    proposal, base, pot = _setup(problem, Preference((1.0, 0.0)))
    res = smc_sample(proposal, base, pot, problem.schedule, list(range(16)), (2,), None, 64,
                     ess_threshold=0.0, twist=True)
    w = res.log_weights.exp() * 64
    assert float(w.std()) < 0.05 and res.ess_min > 0.99 * 64


@pytest.mark.slow
def test_smc_removes_the_jensen_gap_and_estimates_log_z():
    domain = Toy2dDomain("bimodal-linear")
    blend, _ = run_sample(domain, SampleConfig("db-mpa", (0.25, 0.75), n=4096, seed=3))
    smc, x0 = run_sample(domain, SampleConfig("smc", (0.25, 0.75), n=64, seed=3),
                         MethodConfig(smc_particles=64))
    truth = smc["target_mean_rewards"]
    gap = truth[0] - blend["mean_rewards"][0]
    assert gap > 6 * blend["stderr_rewards"][0]                      # the blend is biased
    for est, t, se in zip(smc["mean_rewards"], truth, smc["stderr_rewards"], strict=True):
        assert z_ok(est, t, se)                                        # SMC is not
    assert z_ok(smc["log_z_estimate"], smc["target_log_z"], smc["log_z_stderr"])
    assert smc["runs"] == 64 and smc["nfe_per_sample"] > blend["nfe_per_sample"]
    assert x0.shape == (64, 2)   # one output per run


def test_bad_smc_settings():
    with pytest.raises(UsageError, match="--particles 0"):
        MethodConfig(smc_particles=0)
    with pytest.raises(UsageError, match="--sampler ddpm"):
        run_sample(Toy2dDomain("bimodal", 5), SampleConfig("smc", n=2), MethodConfig("ddim"))
    problem = load_problem("bimodal")
    proposal, base, pot = _setup(problem, Preference((0.5, 0.5)))
    with pytest.raises(UsageError, match="particles=0"):
        smc_sample(proposal, base, pot, problem.schedule, list(range(10)), (2,), 5, 0)


def test_ess_collapse_is_reported_not_hidden():
    """A proposal far from the target (lam = 6 with the experts at lam = 1) in a short chain:
    the final weights sit on one particle; the summary says so and a warning is logged."""
    summary, _ = run_sample(Toy2dDomain("bimodal-linear", 5),
                            SampleConfig("smc", (0.0, 1.0), 0.0, n=4),
                            MethodConfig(smc_particles=64, smc_ess_threshold=0.0))
    assert summary["ess_collapsed_runs"] == 0 and summary["final_ess_min"] > 60  # lam = 0
    problem = load_problem("bimodal-linear")
    pref = Preference((0.5, 0.5))
    proposal, base, _ = _setup(problem, pref)

    def steep(x0, **_):
        return 40.0 * problem.rewards_of(x0.double()).sum(1)

    res = smc_sample(proposal, base, steep, problem.schedule, list(range(4)), (2,), 5, 64,
                     ess_threshold=0.0)
    assert res.collapsed_runs() > 0 and float(res.final_ess.min()) < 2
