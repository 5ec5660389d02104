import math

import torch
from torch import nn

from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.dpok import _transition_loss, returns, rollout
from diffusion_blend.finetune.objective import Task
from diffusion_blend.sampling import Schedule, ddpm_mean_eps_coef, step_from_eps


class PerStepShift(nn.Module):
    """eps_theta(x, t) = theta[t]: one free vector per timestep."""

    def __init__(self, T, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(T, d))

    def forward(self, x, t, **_):
        return self.theta[t.long()] + 0 * x


def test_dpok_gradient_of_a_gaussian_step_matches_the_analytic_gradient():
    """Two steps: x_1 ~ N(m(theta_1), v) (the policy), then x0 = x0_hat(x_1, theta_0).

    With r(x0) = c.x0: d E[r] / d theta_1 = -coef_1 c / sqrt(abar_0), in closed form. The
    estimator's gradient (ratio 1, batch baseline, alpha's KL gradient zero at theta = ref) must
    match it within its Monte-Carlo standard error.
    """
    sched = Schedule.linear(2, 0.1, 0.3)
    d, B = 2, 20000
    c = torch.tensor([1.0, -0.5])
    policy = PerStepShift(2, d)
    task = Task(policy, lambda x, t, **_: torch.zeros_like(x), lambda x0, **_: x0 @ c, sched, (d,))
    cfg = FinetuneConfig(estimator="dpok", w=(1.0,), alpha=1.0, advantage="batch", kl_mode="to-go")
    ro = rollout(task, cfg, list(range(B)))
    A = returns(ro, cfg) - returns(ro, cfg).mean(1, keepdim=True)
    flat = {"x": ro.states.flatten(0, 1), "a": ro.actions.flatten(0, 1),
            "ref": ro.ref_means.flatten(0, 1), "lp": ro.old_logp.reshape(-1), "A": A.reshape(-1)}
    k_of = torch.arange(2).repeat_interleave(B)
    loss, _ = _transition_loss(task, cfg, ro, flat, k_of, torch.arange(2 * B), B)
    loss.backward()
    est = -policy.theta.grad[1]

    abar = sched.abar
    coef = ddpm_mean_eps_coef(float(abar[1]), float(abar[0]))
    truth = -coef * c / math.sqrt(float(abar[0]))
    # per-sample score-function terms for the standard error
    var = (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])
    mu = step_from_eps(torch.zeros(B, d), ro.states[0], float(abar[1]), float(abar[0]), None).mean
    score = (ro.actions[0] - mu).double()
    per = (-coef * score / float(var)) * A[0, :, None].double()
    se = per.std(0) / math.sqrt(B)
    assert torch.all((est.double() - truth.double()).abs() <= 4 * se + 1e-6), (est, truth, se)


def test_returns_published_and_kl_to_go():
    cfg = FinetuneConfig(estimator="dpok", alpha=0.5)

    class R:
        kl = torch.tensor([[1.0], [2.0], [4.0]])
        reward = torch.tensor([10.0])

    assert returns(R, cfg)[:, 0].tolist() == [10 - 0.5 * 6, 10 - 0.5 * 4, 10.0]
    cfg.kl_mode = "published"
    assert returns(R, cfg)[:, 0].tolist() == [10.0, 10.0, 10.0]
