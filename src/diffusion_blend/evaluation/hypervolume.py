"""Hypervolume of a front (all objectives maximised) against a reference point.

The volume of the union of the boxes ``[ref, p]`` over the points ``p`` that dominate ``ref``,
computed exactly by slicing along the last objective (HSO); fronts here have tens of points.
"""

from __future__ import annotations

from collections.abc import Sequence


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` above ``ref`` (points not above ``ref`` add 0)."""
    d = len(ref)
    pts = [tuple(float(v) for v in p) for p in points]
    if any(len(p) != d for p in pts):
        raise ValueError(f"every point needs {d} objectives like the reference point {list(ref)}")
    pts = [p for p in pts if all(v > r for v, r in zip(p, ref, strict=True))]
    return _hv(pts, [float(r) for r in ref])


def _hv(pts: list[tuple[float, ...]], ref: list[float]) -> float:
    if not pts:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in pts) - ref[0]
    pts = sorted(pts, key=lambda p: p[-1], reverse=True)
    total = 0.0
    for i, p in enumerate(pts):
        low = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if p[-1] > low:  # the slice (low, p[-1]] is covered by the first i + 1 points
            total += (p[-1] - low) * _hv([q[:-1] for q in pts[:i + 1]], ref[:-1])
    return total
