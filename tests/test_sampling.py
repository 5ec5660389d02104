import math

import pytest
import torch

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.errors import UsageError
from diffusion_blend.sampling import (
    Schedule,
    ddim_step,
    ddpm_step,
    gaussian_kl,
    gaussian_logprob,
    sample,
    step,
)

SCHED = Schedule.linear(100, 1e-3, 0.05)


def net(seed):
    W = torch.randn(2, 2, generator=torch.Generator().manual_seed(seed)) * 0.3
    return lambda x, t, **_: torch.tanh(x @ W.to(x)) + t[:, None].to(x) / 1000


def test_timesteps():
    assert SCHED.timesteps() == list(range(99, -1, -1))
    ts = SCHED.timesteps(10)
    assert len(ts) == 10 and ts[0] == 99 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    with pytest.raises(UsageError, match="steps=101"):
        SCHED.timesteps(101)
    with pytest.raises(UsageError, match="steps=0"):
        SCHED.timesteps(0)


def test_quadratic_spacing_is_dense_near_zero_and_linear_is_unchanged():
    from dataclasses import replace

    quad = replace(SCHED, spacing="quadratic")
    assert quad.timesteps(10) == [round(99 * (i / 9) ** 2) for i in range(9, -1, -1)]
    assert SCHED.timesteps(10) == [round(99 * i / 9) for i in range(9, -1, -1)]
    assert quad.timesteps() == SCHED.timesteps()            # the full chain either way
    q, lin = quad.timesteps(10), SCHED.timesteps(10)
    assert q[-2] < lin[-2] and q[1] < lin[1]                # finer at t = 0, coarser at T
    with pytest.raises(UsageError, match="spacing 'cosine'"):
        replace(SCHED, spacing="cosine")


def test_an_image_domain_samples_on_its_spec_spacing():
    from dataclasses import replace

    from diffusion_blend.domains.digits import SPEC, DigitsDomain

    class Linear(DigitsDomain):
        spec = replace(SPEC, spacing="linear")

    assert Linear().schedule.timesteps(10)[-3:] == [222, 111, 0]
    assert DigitsDomain().schedule.timesteps(10)[-3:] == [49, 12, 0]     # the shipped chain
    chosen = DigitsDomain(spacing="linear")          # --spacing: the domain's spec follows
    assert chosen.spec.spacing == "linear" and DigitsDomain.spec.spacing == "quadratic"
    assert chosen.schedule.timesteps(10)[-3:] == [222, 111, 0]


def test_ddpm_step_matches_ho_et_al_mean_and_variance():
    """mu = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha), var = beta_tilde (Ho et al. eq. 11)."""
    x, eps = torch.randn(4, 2), torch.randn(4, 2)
    abar = SCHED.abar
    t = 50
    mean, var = ddpm_step(eps, x, float(abar[t]), float(abar[t - 1]))
    beta = float(SCHED.betas[t])
    want = (x - beta / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - beta)
    assert torch.allclose(mean, want.float(), atol=1e-5)
    assert math.isclose(var, (1 - abar[t - 1]) / (1 - abar[t]) * beta, rel_tol=1e-9)


def test_ddim_eta_one_is_ddpm():
    x, eps = torch.randn(4, 2), torch.randn(4, 2)
    a_t, a_s = float(SCHED.abar[70]), float(SCHED.abar[60])
    m1, v1 = ddpm_step(eps, x, a_t, a_s)
    m2, v2 = ddim_step(eps, x, a_t, a_s, eta=1.0)
    assert torch.allclose(m1, m2, atol=1e-5) and math.isclose(v1, v2, rel_tol=1e-9)


def test_step_logprob_is_the_density_sampled_from():
    x = torch.randn(6, 2, dtype=torch.float64)
    noise = torch.randn(6, 2, dtype=torch.float64)
    a_t, a_s = float(SCHED.abar[30]), float(SCHED.abar[29])
    out = step(net(0), x, 30, a_t, a_s, noise)
    dist = torch.distributions.Normal(out.mean, math.sqrt(out.var))
    assert torch.allclose(out.x, out.mean + math.sqrt(out.var) * noise)
    assert torch.allclose(gaussian_logprob(out.x, out.mean, out.var), dist.log_prob(out.x).sum(1))


def test_closed_form_kl_matches_monte_carlo():
    ma, mb, var = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.1, 0.25]]), 0.04
    z = torch.randn(200000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs = ma.double() + math.sqrt(var) * z
    log_ratio = gaussian_logprob(xs, ma.double(), var) - gaussian_logprob(xs, mb.double(), var)
    mc, se = float(log_ratio.mean()), float(log_ratio.std() / math.sqrt(len(xs)))
    assert abs(mc - float(gaussian_kl(ma, mb, var))) <= 4 * se


def test_ddim_eta_zero_ignores_noise():
    x = torch.randn(5, 2)
    a_t, a_s = float(SCHED.abar[40]), float(SCHED.abar[20])
    o1 = step(net(0), x, 40, a_t, a_s, torch.randn(5, 2), eta=0.0, sampler="ddim")
    o2 = step(net(0), x, 40, a_t, a_s, torch.randn(5, 2), eta=0.0, sampler="ddim")
    assert torch.equal(o1.x, o2.x) and o1.var == 0.0


def test_same_seed_same_sample_whatever_the_batch():
    full = sample(net(1), SCHED, list(range(10)), (2,), steps=20).x0
    part = sample(net(1), SCHED, [3, 4], (2,), steps=20).x0
    single = sample(net(1), SCHED, [4], (2,), steps=20).x0
    assert torch.equal(full[3:5], part) and torch.equal(full[4:5], single)
    assert not torch.equal(full[3], full[4])


def test_nfe_logprobs_and_kls_are_reported():
    blend = BlendedDenoiser(net(0), [net(1), net(2)], Preference((0.5, 0.3)))
    res = sample(blend, SCHED, [0, 1, 2], (2,), steps=10, reference=net(0), record=True)
    assert res.nfe_per_sample == 10 * 3 + 10
    assert res.logprobs.shape == (10, 3) and res.kls.shape == (10, 3)
    assert torch.all(res.logprobs[-1] == 0)  # the last DDPM step is noise-free
    assert torch.all(res.kls > 0) and len(res.states) == 11
    same = sample(net(0), SCHED, [0, 1, 2], (2,), steps=10, reference=net(0))
    assert torch.all(same.kls == 0)
