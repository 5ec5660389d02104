import math

import torch

from diffusion_blend.evaluation.metrics import energy_distance, mean_and_stderr


def rice_mean(nu: float, sigma: float) -> float:
    """E|Z| for Z ~ N(m, sigma^2 I) in 2-D with |m| = nu (the Rice distribution's mean)."""
    x = torch.tensor(-(nu**2) / (2 * sigma**2), dtype=torch.float64)
    lag = torch.exp(x / 2) * ((1 - x) * torch.special.i0(-x / 2) - x * torch.special.i1(-x / 2))
    return sigma * math.sqrt(math.pi / 2) * float(lag)


def test_energy_distance_matches_closed_form():
    """N(0, I) vs N((d, 0), I): 2 E|X-Y| - E|X-X'| - E|Y-Y'| = 2 (Rice(d) - Rice(0)), sigma^2=2."""
    truth = 2 * (rice_mean(0.5, math.sqrt(2)) - rice_mean(0.0, math.sqrt(2)))
    vals, nulls = [], []
    for s in range(8):
        g = torch.Generator().manual_seed(s)
        a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
        vals.append(energy_distance(a, b + torch.tensor([0.5, 0.0])))
        nulls.append(energy_distance(a, b))
    v, z = torch.tensor(vals), torch.tensor(nulls)
    assert abs(float(v.mean()) - truth) <= 4 * float(v.std()) / math.sqrt(8)
    assert abs(float(z.mean())) <= 4 * float(z.std()) / math.sqrt(8) + 1e-4


def test_mean_and_stderr():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    means, errs = mean_and_stderr(x)
    assert means == [2.0, 2.0] and abs(errs[0] - 1.0) < 1e-12 and errs[1] == 0.0
