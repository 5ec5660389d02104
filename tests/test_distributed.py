"""Two CPU processes (gloo) share the work and get one process's result: an iteration's batch
(the averaged gradient is the whole batch's), a sweep's rows (the same results.jsonl, row for
row) and a sample's seeds (the same samples and summary)."""

import json
import os
import socket

import pytest
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


def _join(rank, world, port):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, result):
    _join(rank, world, port)
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


SWEEP = dict(domain="toy2d", spec="bimodal", w_grid="0:1:0.5", seeds=16, steps=10,
             lam_grid=(0.5, 2.0), methods=("pretrained", "db-mpa", "soup", "morl", "smc"))


def _sweep(out):
    from diffusion_blend.evaluation.sweep import SweepConfig, run_sweep

    run_sweep(SweepConfig(**SWEEP), out, progress=False)


def _sweep_worker(rank, world, port, out):
    _join(rank, world, port)
    _sweep(out)
    dist.destroy_process_group()


def _results(out):
    """The rows in file order, without what differs from run to run (times, memory)."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "cost"} for r in rows]


@pytest.mark.slow
def test_a_two_process_sweep_equals_the_one_process_sweep_row_for_row(tmp_path):
    _sweep(tmp_path / "one")
    mp.spawn(_sweep_worker, args=(2, _free_port(), tmp_path / "two"), nprocs=2)
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert [r["key"] for r in two] == [r["key"] for r in one]
    assert two == one
    assert any(r["tag"] == "matched" for r in one)       # every phase ran, shards folded in
    assert not list((tmp_path / "two").glob("results.rank*.jsonl"))


def _sample(method, n):
    from diffusion_blend.domains.toy2d import Toy2dDomain
    from diffusion_blend.evaluation.methods import MethodConfig
    from diffusion_blend.evaluation.sample import SampleConfig, run_sample

    summary, x0 = run_sample(Toy2dDomain("bimodal", 10), SampleConfig(method, (0.5, 0.5), n=n,
                                                                        seed=3),
                             MethodConfig(smc_particles=8))
    return {k: v for k, v in summary.items() if k != "seconds"}, x0


def _sample_worker(rank, world, port, method, n, result):
    _join(rank, world, port)
    summary, x0 = _sample(method, n)
    if rank == 0:
        torch.save({"x0": x0}, result)
        result.with_suffix(".json").write_text(json.dumps(summary))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["db-mpa", "smc"])
def test_a_two_process_sample_gathers_the_one_process_samples(tmp_path, method):
    n = 7                                     # shards of 4 and 3 rows
    summary, x0 = _sample(method, n)
    result = tmp_path / "two.pt"
    mp.spawn(_sample_worker, args=(2, _free_port(), method, n, result), nprocs=2)
    assert torch.equal(torch.load(result, weights_only=True)["x0"], x0)
    # the same draws; SMC's weights come from float32 network calls on shards of another size,
    # whose reductions may differ in the last bits (as any batch size's do)
    two, one = json.loads(result.with_suffix(".json").read_text()), json.loads(json.dumps(summary))
    assert two.keys() == one.keys()
    for k, v in one.items():
        numeric = isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float))
        assert two[k] == (pytest.approx(v, rel=1e-6) if numeric else v), k
    assert summary.get("runs", n) == n


def _distill(rank_dir, tok):
    from diffusion_blend.finetune.distill_sd import SdDistillConfig, distill
    from tests.finetune.test_distill_sd import PROMPTS, make_pipe

    cfg = SdDistillConfig(iterations=2, batch_size=2, steps=2, guidance=3.0, lr=1e-2,
                          checkpoint_every=1, height=16, width=16)
    return distill(make_pipe("sd-eps", tok), ["a", "b"], PROMPTS, rank_dir, cfg, progress=False)


def _distill_worker(rank, world, port, out, tok):
    _join(rank, world, port)
    _distill(out, tok / str(rank))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_two_process_distillation_ends_near_the_one_process_weights(tmp_path):
    """Each process blends its share of the prompts; the averaged gradient is the whole
    batch's, so the weights agree up to float summation order (and the pipeline's batch)."""
    from safetensors.torch import load_file

    from diffusion_blend.amortised import AMORTISED_FILE

    _distill(tmp_path / "one", tmp_path / "tok")
    mp.spawn(_distill_worker, args=(2, _free_port(), tmp_path / "two", tmp_path / "tok2"),
             nprocs=2)
    one, two = (load_file(tmp_path / d / AMORTISED_FILE) for d in ("one", "two"))
    assert one.keys() == two.keys()
    moved = [k for k in one if "lora_B" in k and float(one[k].abs().max()) > 0]
    assert moved                                   # the test can fail: the weights moved
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-3), k
