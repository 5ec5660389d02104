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


def test_stratified_stderr_against_the_formula_and_iid_without_strata():
    x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    strata = torch.tensor([0, 0, 1, 1])
    (m,), (se,) = mean_and_stderr(x, strata)
    # se^2 = sum_h n_h s_h^2 / n^2 = (2 * 2 + 2 * 8) / 16
    assert m == 6.5 and abs(se - (20 / 16) ** 0.5) < 1e-12
    assert mean_and_stderr(x, torch.tensor([0, 0, 0, 1])) == mean_and_stderr(x)  # a lone row


def test_stratified_interval_covers_at_its_level_where_the_iid_one_over_covers():
    """A balanced design (stratum s % 10) with large between-stratum effects: the stratified
    interval covers the design's mean as often as ``|t_30| <= 1.96`` (30 = 40 rows - 10 strata;
    binomial 3-sigma band), the iid one nearly always (it counts the fixed effects as noise)."""
    from scipy.stats import t
    g, reps, n = torch.Generator().manual_seed(0), 2000, 40
    strata = torch.arange(n) % 10
    effects = torch.linspace(-3, 3, 10, dtype=torch.float64)[strata]
    x = effects + torch.randn(reps, n, generator=g, dtype=torch.float64)
    truth = effects.mean().item()
    cover = {"strat": 0, "iid": 0}
    for row in x:
        for key, s in (("strat", strata), ("iid", None)):
            (m,), (se,) = mean_and_stderr(row[:, None], s)
            cover[key] += abs(m - truth) <= 1.96 * se
    level = 2 * t.cdf(1.96, n - 10) - 1
    assert abs(cover["strat"] / reps - level) < 3 * (level * (1 - level) / reps) ** 0.5
    assert cover["iid"] / reps > 0.999
