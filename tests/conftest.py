import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)  # the test tensors are small: one thread is fastest on these machines


def z_ok(estimate: float, truth: float, stderr: float, z: float = 4.0) -> bool:
    """Within ``z`` Monte-Carlo standard errors (z = 4: a false alarm about once in 16000)."""
    return abs(estimate - truth) <= z * stderr

