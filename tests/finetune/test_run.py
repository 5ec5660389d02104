import json

import pytest
import torch
from safetensors.torch import load_file

from diffusion_blend.domains.toy2d import load_problem
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.config import FinetuneConfig
from diffusion_blend.finetune.objective import evaluate, iteration_seeds
from diffusion_blend.finetune.toy2d import evaluate_expert, finetune_toy2d, make_task

SMALL = dict(batch_size=32, sample_steps=40, eval_trajectories=2000, checkpoint_every=2)


def cfg_for(estimator, **kw):
    cfg = FinetuneConfig(estimator=estimator, **(SMALL | {"w": (1.0, 0.0)} | kw))
    if estimator == "dpok":
        cfg.lr, cfg.minibatches = 3e-3, 2
    return cfg


@pytest.mark.parametrize("estimator", ["pathwise", "dpok"])
def test_short_run_raises_the_objective(tmp_path, estimator):
    problem = load_problem("bimodal")
    cfg = cfg_for(estimator, iterations=8, lr=1e-2)
    policy = make_task(problem, cfg).policy
    before = evaluate_expert(problem, policy, cfg.w, 2000, 0, cfg.sample_steps)
    assert before["path_kl"] == 0.0  # zero-initialised correction: exactly the pretrained model
    after = finetune_toy2d(problem, cfg, tmp_path / "run", progress=False)
    se = (before["objective_stderr"] ** 2 + after["objective_stderr"] ** 2) ** 0.5
    assert after["objective"] - before["objective"] > 4 * se
    assert after["path_kl"] > 4 * after["path_kl_stderr"]
    for name in ("config.json", "metrics.jsonl", "expert.safetensors", "expert.json",
                 "result.json"):
        assert (tmp_path / "run" / name).is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("estimator", ["pathwise", "dpok"])
def test_resume_gives_bit_identical_weights(tmp_path, estimator):
    problem = load_problem("bimodal")
    cfg = cfg_for(estimator, iterations=5, checkpoint_every=2)
    finetune_toy2d(problem, cfg, tmp_path / "straight", progress=False)
    stopped = finetune_toy2d(problem, cfg, tmp_path / "killed", progress=False, stop_after=3)
    assert stopped["stopped_at"] == 3  # 'killed' after 3 iterations; last checkpoint at 2
    finetune_toy2d(problem, cfg, tmp_path / "killed", resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "expert.safetensors")
    b = load_file(tmp_path / "killed" / "expert.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3, 4, 5]


def test_pathwise_refuses_a_non_differentiable_reward():
    from diffusion_blend.finetune.pathwise import pathwise_loss

    problem = load_problem("bimodal")
    cfg = cfg_for("pathwise")
    task = make_task(problem, cfg)
    task.differentiable = False
    with pytest.raises(UsageError, match="differentiable"):
        pathwise_loss(task, cfg, [0, 1])


def test_resume_errors(tmp_path):
    problem = load_problem("bimodal")
    cfg = cfg_for("pathwise", iterations=2)
    with pytest.raises(UsageError, match="no run"):
        finetune_toy2d(problem, cfg, tmp_path / "empty", resume=True, progress=False)
    finetune_toy2d(problem, cfg, tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="not empty"):
        finetune_toy2d(problem, cfg, tmp_path / "run", progress=False)
    other = cfg_for("pathwise", iterations=2, lr=0.5, batch_size=16)
    with pytest.raises(UsageError, match=r"\['batch_size', 'lr'\]"):
        finetune_toy2d(problem, other, tmp_path / "run", resume=True, progress=False)
    ck = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    weights = ck / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(UsageError, match="corrupt"):
        finetune_toy2d(problem, cfg, tmp_path / "run", resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not written by dblend"):
        finetune_toy2d(problem, cfg, tmp_path / "other", overwrite=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").exists()


@pytest.mark.parametrize("field, value, match", [
    ("estimator", "reinforce", "estimator"), ("alpha", 0.0, "alpha"), ("alpha", -1.0, "alpha"),
    ("kl_mode", "sideways", "kl_mode"), ("iterations", 0, "iterations"),
])
def test_bad_config(field, value, match):
    cfg = FinetuneConfig()
    setattr(cfg, field, value)
    with pytest.raises(UsageError, match=match):
        cfg.check()


def test_evaluate_counts_kl_of_a_shifted_model():
    """A constant eps shift delta at every step has path KL sum_t coef_t^2 |delta|^2/(2 var_t)."""
    from diffusion_blend.finetune.objective import Task
    from diffusion_blend.sampling import Schedule, ddpm_mean_eps_coef

    sched = Schedule.linear(20, 1e-3, 0.2)
    delta = torch.tensor([0.3, -0.1])

    class Shift(torch.nn.Module):
        def forward(self, x, t, **_):
            return torch.zeros_like(x) + delta

    task = Task(Shift(), lambda x, t, **_: torch.zeros_like(x), lambda x, **_: x[:, 0], sched, (2,))
    ev = evaluate(task, iteration_seeds(0, 0, 64), None, alpha=1.0)
    want = 0.0
    for _t, a_t, a_s in sched.transitions():
        beta = 1 - a_t / a_s
        var = (1 - a_s) / (1 - a_t) * beta if a_s < 1 else beta
        want += ddpm_mean_eps_coef(a_t, a_s) ** 2 * float(delta @ delta) / (2 * var)
    assert abs(ev["path_kl"] - want) < 1e-4 * want


def test_truncation_and_checkpointing_change_only_what_they_should():
    """Checkpointing recomputes, so it gives the same gradient; truncating to the last step
    keeps a gradient but a different one; truncating to every step is no truncation."""
    from diffusion_blend.finetune.pathwise import pathwise_loss

    problem = load_problem("bimodal")

    def grads(**kw):
        cfg = FinetuneConfig(estimator="pathwise", w=(1.0, 0.0), sample_steps=10, **kw)
        task = make_task(problem, cfg)
        with torch.no_grad():
            task.policy.net[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        loss, _ = pathwise_loss(task, cfg, list(range(16)))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in task.policy.parameters() if p.requires_grad])

    full = grads()
    assert torch.allclose(grads(grad_checkpointing=True), full, atol=1e-6)
    assert torch.allclose(grads(truncate_steps=10), full, atol=1e-6)
    last = grads(truncate_steps=1)
    assert last.abs().max() > 0 and not torch.allclose(last, full, atol=1e-4)


def _one_step(cfg):
    from diffusion_blend.finetune.run import GuardedStep, _pathwise_iteration

    problem = load_problem("bimodal")
    task = make_task(problem, cfg)
    params = [p for p in task.policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    stats = _pathwise_iteration(task, cfg, iteration_seeds(cfg.seed, 0, cfg.batch_size),
                                GuardedStep(opt, params, cfg, task))
    return [p.detach().clone() for p in params], stats


def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch():
    whole, s1 = _one_step(cfg_for("pathwise", batch_size=12))
    acc, s3 = _one_step(cfg_for("pathwise", batch_size=12, grad_accumulation=3))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, acc, strict=True))
    assert s1["reward"] == pytest.approx(s3["reward"], abs=1e-6)
    with pytest.raises(UsageError, match="grad_accumulation=5"):
        cfg_for("pathwise", batch_size=12, grad_accumulation=5).check()


def test_mixed_precision_runs_and_a_non_finite_step_is_skipped(monkeypatch):
    from diffusion_blend.finetune import run as run_mod

    before, _ = _one_step(cfg_for("pathwise", batch_size=8, mixed_precision="bf16"))
    assert all(torch.isfinite(p).all() for p in before)
    real = run_mod.pathwise_loss

    def nan_loss(task, cfg, seeds):
        loss, stats = real(task, cfg, seeds)
        return loss * float("nan"), stats

    monkeypatch.setattr(run_mod, "pathwise_loss", nan_loss)
    cfg = cfg_for("pathwise", batch_size=8)
    init = [p.detach().clone() for p in make_task(load_problem("bimodal"), cfg).policy.parameters()
            if p.requires_grad]
    after, stats = _one_step(cfg)
    assert stats["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(init, after, strict=True))


def test_a_diverging_run_stops_with_an_error_and_saves_no_expert(tmp_path, capsys):
    from diffusion_blend.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "toy2d", "--lr", "1e30", "--iterations", "4", "--batch-size", "16",
               "--sample-steps", "10", "--eval-trajectories", "16", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "became NaN or infinite" in err.splitlines()[-1]
    assert not (out / "expert.safetensors").exists()
    assert all(json.loads(r)["reward"] == json.loads(r)["reward"]   # no NaN was logged
               for r in (out / "metrics.jsonl").read_text().splitlines())


def test_resume_after_a_torn_metrics_line_and_growing_a_constant_schedule(tmp_path):
    problem = load_problem("bimodal")
    cfg = cfg_for("pathwise", iterations=4, checkpoint_every=2, lr_schedule="constant")
    finetune_toy2d(problem, cfg, tmp_path / "straight", progress=False)
    finetune_toy2d(problem, cfg_for("pathwise", iterations=2, checkpoint_every=2,
                                    lr_schedule="constant"), tmp_path / "grown", progress=False)
    metrics = tmp_path / "grown" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iteration": 3, "rew')   # killed mid-write
    finetune_toy2d(problem, cfg, tmp_path / "grown", resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "expert.safetensors")
    b = load_file(tmp_path / "grown" / "expert.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(r)["iteration"] for r in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    cosine = cfg_for("pathwise", iterations=2, lr_schedule="cosine", stop="budget")
    finetune_toy2d(problem, cosine, tmp_path / "cos", progress=False)
    with pytest.raises(UsageError, match="iterations"):
        finetune_toy2d(problem, cfg_for("pathwise", iterations=4, lr_schedule="cosine",
                                               stop="budget"),
                       tmp_path / "cos", resume=True, progress=False)
