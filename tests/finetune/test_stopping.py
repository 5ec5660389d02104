"""The stopping rule: it stops on a plateau and not on noise; a run stopped by it resumes to the
same weights and the same stopping iteration."""

import json

import torch
from safetensors.torch import load_file

from diffusion_blend.domains.toy2d import load_problem
from diffusion_blend.finetune.stopping import Plateau
from diffusion_blend.finetune.toy2d import finetune_toy2d
from tests.finetune.test_run import cfg_for

N = 512


def _evaluations(means, shared_sd, own_sd, seed=0):
    """Per-trajectory objectives of successive evaluations on one fixed batch: a part shared by
    every evaluation (the same trajectories' luck) plus a fresh part, around ``means``."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(N, generator=g, dtype=torch.float64) * shared_sd
    return [m + shared + own_sd * torch.randn(N, generator=g, dtype=torch.float64)
            for m in means]


def _stop_index(rule, evaluations):
    return next((i for i, v in enumerate(evaluations) if rule.update(v)), None)


def test_stops_on_a_plateau_after_its_patience():
    means = [0.1 * k for k in range(6)] + [0.5] * 20
    assert _stop_index(Plateau(patience=3), _evaluations(means, 1.0, 0.1)) == 8


def test_noise_is_not_progress_and_progress_is_not_noise():
    """Fresh noise of sd 2 per trajectory (a standard error of 0.09): gains of 0.2 per
    evaluation keep the run going; the same noise on a plateau stops it."""
    rising = _evaluations([0.2 * k for k in range(30)], 1.0, 2.0)
    assert _stop_index(Plateau(patience=3), rising) is None
    flat = _evaluations([0.0] * 30, 1.0, 2.0, seed=1)
    assert _stop_index(Plateau(patience=3), flat) <= 6


def test_gains_the_evaluation_cannot_resolve_do_not_keep_a_run_going():
    """A creep of 1e-4 per evaluation, far below the estimate's 0.04: it stops."""
    creep = _evaluations([1e-4 * k for k in range(30)], 1.0, 0.0)
    assert _stop_index(Plateau(patience=3), creep) == 3


def test_the_state_survives_a_checkpoint():
    rule = Plateau(patience=2)
    evals = _evaluations([0.0, 0.0, 0.0], 1.0, 0.1)
    rule.update(evals[0])
    rule.update(evals[1])
    again = Plateau(patience=2)
    again.load_state_dict(rule.state_dict())
    assert again.update(evals[2]) == rule.update(evals[2]) is True


def test_a_run_stopped_by_the_rule_resumes_to_the_same_weights(tmp_path):
    """lr 1e-7: nothing improves, so the rule stops after ``patience`` more evaluations; a run
    killed before that resumes to the same stopping iteration and weights."""
    problem = load_problem("bimodal")
    cfg = cfg_for("pathwise", iterations=200, lr=1e-7, stop="plateau", eval_every=2,
                  patience=2, stop_trajectories=64, checkpoint_every=50)
    straight = finetune_toy2d(problem, cfg, tmp_path / "straight", progress=False)
    assert straight["converged"] and straight["iterations"] == 6
    killed = finetune_toy2d(problem, cfg, tmp_path / "killed", progress=False, stop_after=3)
    assert killed["stopped_at"] == 3
    resumed = finetune_toy2d(problem, cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed["iterations"] == 6 and resumed["converged"]
    a = load_file(tmp_path / "straight" / "expert.safetensors")
    b = load_file(tmp_path / "killed" / "expert.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "killed" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    again = finetune_toy2d(problem, cfg, tmp_path / "killed", resume=True, progress=False)
    assert again["iterations"] == 6   # a converged run stays converged
