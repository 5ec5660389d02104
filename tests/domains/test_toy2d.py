import copy
import math

import pytest
import torch

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.domains.toy2d import PRESETS, SpecError, load_problem, parse_spec
from diffusion_blend.evaluation.metrics import mean_and_stderr
from diffusion_blend.sampling import sample
from diffusion_blend.seeding import seed_range
from tests.conftest import z_ok


def grid_integrals(problem, c, half=9.0, n=801):
    """Brute force on a 2-D grid: log Z, mean and E[r_i] of p_pre exp(sum c_i r_i / alpha)."""
    xs = torch.linspace(-half, half, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx, gy], -1).reshape(-1, 2)
    logp = problem.mixture.log_prob(pts) + (problem.rewards_of(pts) @ torch.tensor(
        c, dtype=torch.float64)) / problem.alpha
    cell = (xs[1] - xs[0]) ** 2
    p = logp.exp() * cell
    Z = p.sum()
    return float(Z.log()), (p[:, None] * pts).sum(0) / Z, (p[:, None] * problem.rewards_of(
        pts)).sum(0) / Z


@pytest.mark.parametrize("spec, c", [
    ("bimodal-linear", [0.7, 0.4]),        # linear rewards
    ("bimodal", [0.0, 1.0]),               # quadratic alone
    ("bimodal", [0.6, 0.8]),               # mixed linear + quadratic
    ("gaussian", [1.5, -0.3]),             # correlated covariance, negative weight
])
def test_tilt_matches_brute_force_integration(spec, c):
    problem = load_problem(spec)
    m, log_z = problem.tilted(c)
    bf_log_z, bf_mean, bf_rewards = grid_integrals(problem, c)
    assert math.isclose(log_z, bf_log_z, abs_tol=1e-6)
    assert torch.allclose(m.mean(), bf_mean, atol=1e-6)
    assert torch.allclose(torch.tensor(problem.expected_rewards(m), dtype=torch.float64),
                          bf_rewards, atol=1e-6)


@pytest.mark.parametrize("spec", ["bimodal", "gaussian", "trimodal-3d"])
def test_exact_eps_is_minus_scaled_score_of_noised_mixture(spec):
    problem = load_problem(spec)
    den = problem.base_denoiser()
    m = problem.mixture
    for t in (0, 300, 999):
        abar = float(problem.schedule.abar[t])
        comp = torch.distributions.MultivariateNormal(
            math.sqrt(abar) * m.means, abar * m.covs + (1 - abar) * torch.eye(m.dim))
        x = torch.randn(7, m.dim, dtype=torch.float64, requires_grad=True)
        logp = torch.logsumexp(comp.log_prob(x[:, None]) + m.weights.log(), 1).sum()
        (score,) = torch.autograd.grad(logp, x)
        eps = den(x.detach(), torch.full((7,), t))
        assert torch.allclose(eps, -math.sqrt(1 - abar) * score, atol=1e-9)
    # rows at different timesteps are handled row by row
    x = torch.randn(3, m.dim, dtype=torch.float64)
    ts = torch.tensor([0, 500, 999])
    rowwise = torch.cat([den(x[i:i + 1], ts[i:i + 1]) for i in range(3)])
    assert torch.allclose(den(x, ts), rowwise, atol=1e-12)


def test_exact_samples_match_closed_form_moments():
    problem = load_problem("bimodal")
    m, _ = problem.tilted([0.5, 0.5])
    x = m.sample(seed_range(0, 40000))
    means, errs = mean_and_stderr(x)
    for got, want, se in zip(means, m.mean().tolist(), errs, strict=True):
        assert z_ok(got, want, se)
    r, r_se = mean_and_stderr(problem.rewards_of(x))
    for got, want, se in zip(r, problem.expected_rewards(m), r_se, strict=True):
        assert z_ok(got, want, se)


def _sampled_rewards(problem, denoiser, n, seed=0):
    x0 = sample(denoiser, problem.schedule, seed_range(seed, n), (problem.mixture.dim,)).x0
    return mean_and_stderr(problem.rewards_of(x0.double()))


def _blend(problem, pref):
    experts = [problem.expert_denoiser(i) for i in range(problem.k)]
    return BlendedDenoiser(problem.base_denoiser(), experts, pref)


def test_pretrained_exact_eps_reproduces_the_base():
    problem = load_problem("bimodal")
    means, errs = _sampled_rewards(problem, problem.base_denoiser(), 10000)
    for got, want, se in zip(means, problem.expected_rewards(problem.mixture), errs, strict=True):
        assert z_ok(got, want, se)


@pytest.mark.parametrize("w, lam", [((0.3, 0.7), 1.0), ((0.5, 0.5), 2.0), ((0.8, 0.2), 0.5)])
def test_blend_is_exact_for_gaussian_base_and_linear_rewards(w, lam):
    problem = load_problem("gaussian")
    pref = Preference(w, lam, allow_extrapolation=True)
    target, _ = problem.target(pref)
    # the blended eps is the target's exact eps (the theory), at every state ...
    x, t = torch.randn(50, 2, dtype=torch.float64), torch.full((50,), 400)
    assert torch.allclose(_blend(problem, pref)(x, t), problem.denoiser(target)(x, t), atol=1e-9)
    # ... so its samples have the target's expected rewards, within Monte-Carlo error
    means, errs = _sampled_rewards(problem, _blend(problem, pref), 6000)
    for got, want, se in zip(means, problem.expected_rewards(target), errs, strict=True):
        assert z_ok(got, want, se)


@pytest.mark.slow
def test_jensen_gap_on_a_multimodal_base():
    problem = load_problem("bimodal-linear")
    pref = Preference((0.25, 0.75))
    target, _ = problem.target(pref)
    assert math.isclose(problem.expected_rewards(target)[0], 0.9992, abs_tol=1e-4)
    means, errs = _sampled_rewards(problem, _blend(problem, pref), 8000)
    assert abs(means[0] - problem.expected_rewards(target)[0]) > 4 * errs[0]
    for i in range(2):  # endpoints: the blend is one exact expert, so it matches the target
        e = tuple(1.0 if j == i else 0.0 for j in range(2))
        end_target, _ = problem.target(Preference(e))
        m, s = _sampled_rewards(problem, _blend(problem, Preference(e)), 8000, seed=1)
        for got, want, se in zip(m, problem.expected_rewards(end_target), s, strict=True):
            assert z_ok(got, want, se)


def _spec(**changes):
    spec = copy.deepcopy(PRESETS["bimodal"])
    for path, value in changes.items():
        node, keys = spec, path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return spec


@pytest.mark.parametrize("changes, match", [
    ({"alpha": KeyError}, "missing"),
    ({"colour": "red"}, "unknown"),
    ({"mixture__weights": [0.5, 0.6]}, "sum to 1"),
    ({"mixture__covs": [[[1, 0], [0, -1]], [[1, 0], [0, 1]]]}, "positive definite"),
    ({"mixture__covs": [[[1, 0.5], [0, 1]], [[1, 0], [0, 1]]]}, "symmetric"),
    ({"rewards__0__type": "cubic"}, "not known"),
    ({"rewards__1__Q": [[-5, 0], [0, -5]]}, "not normalisable"),
    ({"rewards__0__a": [1, 0, 0]}, "shape"),
    ({"alpha": 0}, "alpha"),
    ({"schedule__T": 1.5}, "integer"),
    ({"schedule__beta_end": 2.0}, "schedule"),
])
def test_bad_specs(changes, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(_spec(**changes))


def test_non_normalisable_target_is_refused():
    problem = load_problem("bimodal")
    with pytest.raises(SpecError, match="not normalisable"):
        problem.target(Preference((0.0, -4.0), allow_extrapolation=True))
