"""Fashion-MNIST from IDX files: tiny synthetic files here (the Debian package is not needed)."""

import gzip

import numpy as np
import pytest
import torch

from diffusion_blend.domains.fashion import FILES, load_data, read_idx
from diffusion_blend.errors import UsageError


def write_idx(path, array, gz=True):
    a = np.asarray(array, dtype=np.uint8)
    head = bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    data = head + a.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 28, 28))
        x[0] = 255                                      # one flat (all garment) image
        write_idx(tmp_path / FILES[f"{split}_x"], x)
        write_idx(tmp_path / FILES[f"{split}_y"], rng.integers(0, 10, n))
    return tmp_path


def test_idx_files_read_back_exactly(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        write_idx(tmp_path / "a", a, gz)
        assert np.array_equal(read_idx(tmp_path / "a"), a)


def test_splits_are_scaled_to_minus_one_one_and_downsampled_by_area(root):
    full, small = load_data(root, 28), load_data(root, 16)
    raw = torch.from_numpy(read_idx(root / FILES["train_x"]).copy()).float()
    assert full["train_x"].shape == (6, 1, 28, 28) and small["test_x"].shape == (4, 1, 16, 16)
    assert torch.allclose(full["train_x"][:, 0], raw / 255 * 2 - 1)
    # area averaging: a flat image stays flat, every pixel stays in [-1, 1]
    assert torch.equal(small["train_x"][0], torch.full((1, 16, 16), 1.0))
    assert small["train_x"].abs().max() <= 1.0
    assert full["train_y"].dtype == torch.long and len(full["test_y"]) == 4


def test_missing_or_broken_files_say_how_to_install(root, tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_data(tmp_path / "nowhere")
    (root / FILES["test_y"]).write_bytes(gzip.compress(b"\x00\x01\x02\x03"))
    with pytest.raises(UsageError, match="not an IDX file"):
        load_data(root)
    write_idx(root / FILES["test_y"], np.zeros(3))                     # 4 images, 3 labels
    with pytest.raises(UsageError, match="do not pair up"):
        load_data(root)
    with pytest.raises(UsageError, match="size 20"):
        load_data(root, 20)
