import itertools

import numpy as np
import pytest

from diffusion_blend.evaluation.hypervolume import hypervolume


def brute_force(points: np.ndarray, ref: np.ndarray) -> float:
    """Sum the cells of the grid spanned by all coordinates that some point dominates."""
    axes = [np.unique(np.concatenate([[r], points[points[:, j] > r, j]]))
            for j, r in enumerate(ref)]
    total = 0.0
    for idx in itertools.product(*(range(len(a) - 1) for a in axes)):
        lo = np.array([a[i] for a, i in zip(axes, idx, strict=True)])
        hi = np.array([a[i + 1] for a, i in zip(axes, idx, strict=True)])
        if (points >= hi).all(1).any():
            total += float(np.prod(hi - lo))
    return total


@pytest.mark.parametrize("d,n,seed", [(2, 1, 0), (2, 7, 1), (2, 15, 2), (3, 5, 3), (3, 12, 4)])
def test_hypervolume_matches_brute_force(d, n, seed):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, d))
    ref = rng.normal(size=d) - 1.0
    assert hypervolume(pts.tolist(), ref.tolist()) == pytest.approx(brute_force(pts, ref),
                                                                    rel=1e-12, abs=1e-12)


def test_points_below_the_reference_add_nothing():
    assert hypervolume([[1.0, 1.0], [-1.0, 5.0]], [0.0, 0.0]) == pytest.approx(1.0)
    assert hypervolume([], [0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="objectives"):
        hypervolume([[1.0, 2.0, 3.0]], [0.0, 0.0])
