"""Two CPU processes (gloo) share an iteration's batch: the averaged gradient is the one of the
whole batch in one process (so the run does not depend on the number of processes)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_blend.distributed import Dist
from diffusion_blend.domains.toy2d import load_problem
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import iteration_seeds
from diffusion_blend.finetune.pathwise import pathwise_loss
from diffusion_blend.finetune.toy2d import make_task

CFG = dict(estimator="pathwise", w=(1.0, 0.0), batch_size=8, sample_steps=20)


def _grads(shard) -> dict:
    torch.set_num_threads(1)
    cfg = FinetuneConfig(**CFG)
    task = make_task(load_problem("bimodal"), cfg)
    with torch.no_grad():  # a non-zero output layer, so every parameter gets a gradient
        task.policy.net[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    d = Dist()
    loss, _ = pathwise_loss(task, cfg, d.shard(iteration_seeds(0, 0, 8)) if shard else
                            iteration_seeds(0, 0, 8))
    loss.backward()
    params = [p for p in task.policy.parameters() if p.requires_grad]
    d.sync_grads(params)
    return {n: p.grad.clone() for n, p in task.policy.named_parameters() if p.requires_grad}


def _worker(rank, world, port, result):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grads = _grads(shard=True)
    if rank == 0:
        torch.save(grads, result)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_to_the_whole_batch_gradient(tmp_path):
    single = _grads(shard=False)
    result = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(result)), nprocs=2)
    two = torch.load(result, weights_only=True)
    assert single.keys() == two.keys()
    # Only the float32 summation order differs: a reordered sum of m terms is off by at most
    # about m * eps of its scale, here m = 8 trajectories x 20 steps.
    bound = torch.finfo(torch.float32).eps * 8 * CFG["sample_steps"]
    for k in single:
        scale = float(single[k].abs().max())
        assert float((single[k] - two[k]).abs().max()) <= bound * scale, k
    assert any(float(g.abs().max()) > 0 for g in single.values())
