"""The fashion domain: a class-conditional diffusion model on Fashion-MNIST, read offline from
Debian's ``dataset-fashion-mnist`` IDX files (or any directory holding the same four files).

Images are ``1 x 16 x 16`` in [-1, 1] (the garment bright, as in the files), downsampled from
28 by area averaging: the measured cost of a training step on 2 CPU threads (0.34 s at 16 px
with 1.1M parameters and batch 128) lets the base train in half an hour. The networks, weight
files and the domain object are the image domains' (``domains.images``); the prompt is the
class (``CLASSES``), the pair is bright (``ink``) against soft (``smooth``).
"""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np
import torch

from diffusion_blend.domains.images import ImageDomain, ImageSpec
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


SIZE = 16
UNET_CONFIG = dict(
    sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1,
    num_class_embeds=11, norm_num_groups=8, attention_head_dim=16,
)


def spec(root: str | Path | None = None) -> ImageSpec:
    """The fashion domain reading its data from ``root`` (Debian's directory by default)."""
    return ImageSpec(
        name="fashion", classes=CLASSES, size=SIZE, unet=UNET_CONFIG,
        load_data=partial(load_data, root, SIZE),
        data_source={"source": "Fashion-MNIST (IDX files)", "size": SIZE,
                     "split": "the files' train / test"},
        weights_dir=Path(__file__).resolve().parent.parent / "weights" / "fashion",
        pair=("ink", "smooth"), rewards=("class-logprob", "ink", "smooth"),
        finetuned={"ink": "images-pathwise", "smooth": "images-pathwise"},
        base_config={"iterations": 5000, "guidance": 2.0, "guidance_iterations": 500,
                     "guidance_lr": 3e-4}, alpha=0.1,
        morl_grid=(0.2, 0.5, 0.8), classifier_config={"epochs": 10, "batch_size": 128})


SPEC = spec()


class FashionDomain(ImageDomain):
    """fashion as a ``Domain`` (``ImageDomain`` on ``SPEC``)."""

    spec = SPEC
