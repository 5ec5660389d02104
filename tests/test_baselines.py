"""Each baseline does what its definition says, on tiny components."""

import pytest
import torch

from diffusion_blend.adapters import AdapterView, LoraSoup, add_lora
from diffusion_blend.baselines import RewardGuided, code_sample
from diffusion_blend.domains.toy2d import load_problem, mixture_soup
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import sample
from tests.test_adapters import Tiny, _perturb

STEPS = 40


@pytest.fixture(scope="module")
def problem():
    return load_problem("bimodal")


def _r1(x0, **_):
    return x0[:, 0].double()   # the first basis reward of "bimodal": linear in x[0]


def test_code_with_one_candidate_is_plain_sampling(problem):
    seeds = list(range(64))
    plain = sample(problem.base_denoiser(), problem.schedule, seeds, (2,), STEPS)
    res, evals = code_sample(problem.base_denoiser(), problem.schedule, seeds, (2,), STEPS,
                             _r1, n=1, block=5)
    assert torch.equal(res.x0, plain.x0) and evals == 0 and res.nfe_per_sample == STEPS


def test_code_keeps_the_best_continuation(problem):
    seeds = list(range(400))
    base = problem.base_denoiser()
    plain = sample(base, problem.schedule, seeds, (2,), STEPS).x0[:, 0].double()
    res, evals = code_sample(base, problem.schedule, seeds, (2,), STEPS, _r1, n=4, block=10)
    best = res.x0[:, 0].double()
    diff = best - plain
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5          # best-of-4 raises r
    assert evals == 4 * 4 and res.nfe_per_sample == 4 * STEPS + 4 * 3   # 3 lookaheads
    with pytest.raises(UsageError, match="n=0"):
        code_sample(base, problem.schedule, seeds, (2,), STEPS, _r1, n=0, block=1)


def test_rgg_with_zero_gamma_is_plain_sampling_and_positive_gamma_follows_the_gradient(
        problem):
    seeds = list(range(400))
    base = problem.base_denoiser()
    plain = sample(base, problem.schedule, seeds, (2,), STEPS).x0
    off = sample(RewardGuided(base, _r1, problem.schedule, 0.0), problem.schedule, seeds, (2,),
                 STEPS).x0
    assert torch.equal(off, plain)
    on = sample(RewardGuided(base, _r1, problem.schedule, 0.5, normalise=True), problem.schedule,
                seeds, (2,), STEPS).x0
    diff = (on[:, 0] - plain[:, 0]).double()
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5


def test_rgg_shifts_eps_by_the_reward_gradient_through_x0_hat(problem):
    """For a linear reward r = a.x0 and x0_hat = (x - sqrt(1-abar) eps) / sqrt(abar), the DPS
    gradient includes the network's Jacobian; with a constant-eps denoiser it is a / sqrt(abar)."""
    def const(x, t, **_):
        return torch.zeros_like(x) + 0.0 * x
    t = torch.full((3,), 500)
    abar = float(problem.schedule.abar[500])
    g = RewardGuided(const, _r1, problem.schedule, 2.0)(torch.randn(3, 2), t)
    expected = -(1 - abar) ** 0.5 * 2.0 / abar ** 0.5
    assert torch.allclose(g[:, 0].double(), torch.full((3,), expected, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(g[:, 1], torch.zeros(3))


def test_lora_soup_is_the_interpolated_weights_and_its_vertices_are_the_experts():
    torch.manual_seed(0)
    model = Tiny().requires_grad_(False)
    for i, name in enumerate(("a", "b")):
        add_lora(model, name, 2, ["inp", "out"], seed=i)
        _perturb(model, name, i)
    x, t = torch.randn(6, 3), torch.full((6,), 3)
    expert_a = AdapterView(model, "a")(x, t)
    assert torch.equal(LoraSoup(model, ["a", "b"], [1.0, 0.0])(x, t), expert_a)
    assert torch.equal(LoraSoup(model, ["a", "b"], [0.0, 0.0])(x, t),
                       AdapterView(model, None)(x, t))
    c = [0.3, 0.7]
    merged = Tiny()
    merged.load_state_dict({k: v for k, v in _merged(model, c).items()})
    assert torch.allclose(LoraSoup(model, ["a", "b"], c)(x, t), merged(x, t), atol=1e-6)
    assert torch.equal(AdapterView(model, "a")(x, t), expert_a)   # scales and adapters restored


def _merged(model, c) -> dict:
    """``W0 + sum_i c_i * scaling * B_i A_i`` for each layer, written out by hand."""
    out = {}
    for layer in ("inp", "out"):
        mod = getattr(model, layer)
        delta = sum(ci * mod.scaling[n] * mod.lora_B[n].weight @ mod.lora_A[n].weight
                    for n, ci in zip(("a", "b"), c, strict=True))
        out[f"{layer}.weight"] = mod.base_layer.weight + delta
        out[f"{layer}.bias"] = mod.base_layer.bias
    return out


def test_mixture_soup_vertices_are_the_experts(problem):
    experts = [problem.tilted(e)[0] for e in ([1.0, 0.0], [0.0, 1.0])]
    for i, e in enumerate(([1.0, 0.0], [0.0, 1.0])):
        m = mixture_soup(problem.mixture, experts, e)
        for f in ("weights", "means", "covs"):
            assert torch.allclose(getattr(m, f), getattr(experts[i], f), atol=1e-12)
    half = mixture_soup(problem.mixture, experts, [0.5, 0.5])
    assert torch.allclose(half.means, (experts[0].means + experts[1].means) / 2)
    with pytest.raises(UsageError, match="positive definite"):
        mixture_soup(problem.mixture, experts, [0.0, 40.0])

