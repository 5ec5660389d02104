"""The digits domain: a small class-conditional diffusion model on scikit-learn's 8x8 digits.

The "prompt" is the digit class 0-9; class 10 is the null class used for classifier-free
guidance. Images are 1x8x8 in [-1, 1]. Everything here trains on 2 CPU cores in minutes, and
the shipped weights under ``diffusion_blend/weights/digits`` are what the recipes produce. The
networks, weight files and the domain object are the image domains' (``domains.images``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_blend.domains.images import ImageDomain, ImageSpec

# ---------------------------------------------------------------------------- data


def load_data(split_seed: int = 0, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits in [-1, 1], split into train / test by a seeded shuffle."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
    num_class_embeds=11, norm_num_groups=8, attention_head_dim=16,
)
SPEC = ImageSpec(
    name="digits", classes=tuple(str(i) for i in range(10)), size=8, unet=UNET_CONFIG,
    load_data=load_data,
    data_source={"source": "sklearn.datasets.load_digits", "split_seed": 0,
                 "test_fraction": 0.2},
    weights_dir=Path(__file__).resolve().parent.parent / "weights" / "digits",
    pair=("ink", "smooth"),
    rewards=("class", "class-logprob", "ink", "crisp", "symmetry", "smooth"),
    finetuned={"ink": "images-pathwise", "symmetry": "images-pathwise",
               "crisp": "images-pathwise", "smooth": "images-pathwise"}, alpha=0.25,
    steps=40, spacing="quadratic",   # the chain the experts reach >= 0.8 of their optimum on
    base_config={"iterations": 2500}, classifier_config={"epochs": 40})
PAIR = SPEC.pair   # the pair that trades off: MORL and the demo use it


class DigitsDomain(ImageDomain):
    """digits as a ``Domain`` (``ImageDomain`` on ``SPEC``)."""

    spec = SPEC
