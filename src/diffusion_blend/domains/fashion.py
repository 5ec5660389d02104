"""The fashion domain (issue 16, in progress): Fashion-MNIST, read offline from Debian's
``dataset-fashion-mnist`` IDX files (or any directory holding the same four files).

Only the data is here so far; the class-conditional base, the judge, the rewards and the experts
follow the digits domain's shape. Images are ``1 x S x S`` in [-1, 1] (ink, i.e. the garment,
bright as in the files), ``S`` 28 or downsampled by area averaging (16 by default: the
measured cost of a training step, issue 16).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from diffusion_blend.errors import UsageError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
         "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
INSTALL = ("install it with `apt-get install dataset-fashion-mnist` (Debian), or give a "
           "directory holding the four IDX files (train-images-idx3-ubyte.gz, ...)")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as an array: unsigned bytes, 1 (labels) or 3 (images)
    dimensions, big-endian sizes after the magic number."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] not in (1, 3):
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4]!r}); "
                         f"{INSTALL}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path} is truncated: {body.size} bytes for shape {shape}; {INSTALL}")
    return body.reshape(shape)


def load_data(root: str | Path | None = None, size: int = 16) -> dict[str, torch.Tensor]:
    """Train and test splits: images ``[N, 1, size, size]`` in [-1, 1], labels ``[N]``."""
    if size not in (16, 28):
        raise UsageError(f"size {size} is not allowed; use 28 (the files) or 16 (downsampled)")
    root = Path(root) if root is not None else DATA_DIR
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        raise UsageError(f"Fashion-MNIST is missing in {root} ({', '.join(missing)}); {INSTALL}")
    out = {k: torch.from_numpy(read_idx(root / f).copy()) for k, f in FILES.items()}
    for split in ("train", "test"):
        x, y = out[f"{split}_x"], out[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"{root}: {split} images {tuple(x.shape)} and labels "
                             f"{tuple(y.shape)} do not pair up; {INSTALL}")
        x = x[:, None].float() / 255.0
        if size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        out[f"{split}_x"], out[f"{split}_y"] = x * 2.0 - 1.0, y.long()
    return out
