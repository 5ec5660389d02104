import numpy as np
import pytest
import torch

from diffusion_blend.bench.toy2d import _as_numpy, bench_toy2d, numpy_blend_sample
from diffusion_blend.domains.toy2d import load_problem
from tests.conftest import z_ok


@pytest.mark.slow
def test_numpy_reference_samples_the_same_law():
    """The benchmark's numpy reference is a faithful copy of the loop (same rewards in law)."""
    problem = load_problem("bimodal")
    mixtures = [_as_numpy(problem.expert_denoiser(i).mixture) for i in range(2)]
    x = numpy_blend_sample(mixtures, [0.5, 0.5], problem.schedule.abar.numpy(), 3000, seed=0)
    r_np = problem.rewards_of(torch.from_numpy(x.astype(np.float64)))
    from diffusion_blend.blend import BlendedDenoiser, Preference
    from diffusion_blend.sampling import sample

    blend = BlendedDenoiser(None, [problem.expert_denoiser(i) for i in range(2)],
                            Preference((0.5, 0.5)))
    r_t = problem.rewards_of(sample(blend, problem.schedule, range(3000), (2,)).x0.double())
    for i in range(2):
        se = (r_np[:, i].var() / 3000 + r_t[:, i].var() / 3000).sqrt()
        assert z_ok(float(r_np[:, i].mean()), float(r_t[:, i].mean()), float(se))


def test_bench_reports_both_loops_and_their_ratio():
    out = bench_toy2d(n=64, steps=1000)
    assert out["nfe_per_sample"] == 2000          # two experts; the base is skipped (sum w = 1)
    assert out["speedup_vs_numpy"] == out["numpy_seconds"] / out["seconds"]
    short = bench_toy2d(n=64, steps=20)           # the numpy loop runs the whole schedule only
    assert short["nfe_per_sample"] == 40 and "speedup_vs_numpy" not in short
