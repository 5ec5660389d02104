"""Per-sample random streams: sample ``i`` with seed ``s`` is the same whatever batch it is in.

Each sample owns a PCG64 generator keyed by ``(seed, stream)``; a sampler draws all the noise a
sample needs in one call (initial state and one draw per step), which keeps the per-sample cost
to one generator construction.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from diffusion_blend.errors import UsageError

MAX_SEED = 2**64


def _key(stream: str) -> int:
    return zlib.crc32(stream.encode())


def _generator(seed: int, stream: str) -> np.random.Generator:
    if not 0 <= int(seed) < MAX_SEED:
        raise UsageError(f"seed={seed} is not allowed; seeds are 0 ... 2**64 - 1 (a larger "
                         "one would alias a smaller seed)")
    return np.random.Generator(np.random.PCG64((_key(stream) << 64) | int(seed)))


def sample_normals(
    seeds: Sequence[int], shape: tuple[int, ...], stream: str = "noise",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals of ``shape`` per seed, stacked into ``[len(seeds), *shape]``."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    out = np.empty((len(seeds), *shape), dtype=np_dtype)
    for i, s in enumerate(seeds):
        _generator(s, stream).standard_normal(shape, dtype=np_dtype, out=out[i])
    return torch.from_numpy(out).to(dtype)


def sample_uniforms(seeds: Sequence[int], shape: tuple[int, ...], stream: str) -> torch.Tensor:
    """Uniforms on [0, 1) of ``shape`` per seed, stacked into ``[len(seeds), *shape]`` (float64)."""
    out = np.empty((len(seeds), *shape), dtype=np.float64)
    for i, s in enumerate(seeds):
        out[i] = _generator(s, stream).random(shape)
    return torch.from_numpy(out)


def check_seed_range(seed: int, n: int) -> None:
    """Refuse a run whose seeds ``seed ... seed + n - 1`` leave ``0 ... 2**64 - 1``."""
    if not 0 <= int(seed) or int(seed) + int(n) > MAX_SEED:
        raise UsageError(f"seeds {seed} ... {int(seed) + int(n) - 1} are not allowed; seeds "
                         "are 0 ... 2**64 - 1")


def seed_range(seed: int, n: int) -> list[int]:
    """The per-sample seeds of a run: ``seed, seed + 1, ..., seed + n - 1``."""
    check_seed_range(seed, n)
    return list(range(int(seed), int(seed) + int(n)))
