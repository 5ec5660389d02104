import math

import torch

from diffusion_blend.finetune.objective import kl_step
from diffusion_blend.sampling import Schedule, gaussian_kl, step_from_eps


def test_kl_from_eps_difference_equals_kl_of_the_two_step_means():
    sched = Schedule.linear(100)
    abar = sched.abar
    g = torch.Generator().manual_seed(0)
    x, e1, e2 = (torch.randn(8, 3, generator=g) for _ in range(3))
    for t, s in ((60, 59), (0, None)):
        a_t, a_s = float(abar[t]), 1.0 if s is None else float(abar[s])
        out, kl = kl_step(e1, e2, x, a_t, a_s, torch.randn(8, 3, generator=g))
        ref = step_from_eps(e2, x, a_t, a_s, None)
        assert torch.allclose(kl, gaussian_kl(out.mean, ref.mean, out.kl_var), rtol=1e-4)
    # the noise-free last step's KL uses its beta, so x0 cannot be moved for free
    assert math.isclose(out.kl_var, 1 - float(abar[0]), rel_tol=1e-9) and out.var == 0.0
