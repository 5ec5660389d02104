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
    return next((i for i, v in enumerate(evaluations) if rule.update(v, 10 * (i + 1))), None)


def test_finds_a_plateau_once_both_windows_are_flat():
    """Rising by 0.1 per evaluation until index 5, flat after: the first window of three that
    does not beat the three before it is index 10's (7-10 against 5-7)."""
    means = [0.1 * k for k in range(6)] + [0.5] * 20
    assert _stop_index(Plateau(patience=3), _evaluations(means, 1.0, 0.1)) == 10


def test_noise_is_not_progress_and_progress_is_not_noise():
    """Fresh noise of sd 2 per trajectory (a paired standard error of 0.07 between windows of
    three): gains of 0.2 per evaluation keep the run going; the same noise on a plateau stops
    it at the first full pair of windows."""
    rising = _evaluations([0.2 * k for k in range(30)], 1.0, 2.0)
    assert _stop_index(Plateau(patience=3), rising) is None
    flat = _evaluations([0.0] * 30, 1.0, 2.0, seed=1)
    assert _stop_index(Plateau(patience=3), flat) == 5


def test_a_slow_real_climb_keeps_going_and_an_unresolvable_one_stops():
    """The same creep of 0.01 per evaluation: resolved when the trajectories' own noise is
    small (sd 0.01: the shared luck cancels in the paired difference), not when it is 2."""
    creep = [0.01 * k for k in range(30)]
    assert _stop_index(Plateau(patience=3), _evaluations(creep, 1.0, 0.01)) is None
    assert _stop_index(Plateau(patience=3), _evaluations(creep, 1.0, 2.0)) == 5


def test_a_progress_floor_ends_a_resolved_but_negligible_climb():
    """The resolved creep of 0.01 per evaluation: without a floor it never stops; with a floor
    of 0.22 of the gain so far (0.01 * (i - 1) at index i: the late window's mean against the
    first evaluation) it stops once a window's 0.03 falls below it: index 15 (0.0308), not 14
    (0.0286)."""
    creep = _evaluations([0.01 * k for k in range(30)], 1.0, 0.001)
    assert _stop_index(Plateau(patience=3), creep) is None
    assert _stop_index(Plateau(patience=3, min_progress=0.22), creep) == 15


def test_the_decay_follows_the_plateau_and_ends_the_run():
    rule = Plateau(patience=1, decay=0.5, min_decay=4)
    flat = _evaluations([0.0] * 3, 1.0, 0.1)
    assert not rule.update(flat[0], 10) and rule.lr_factor(10) == 1.0
    assert rule.update(flat[1], 20)
    assert (rule.found, rule.length) == (20, 10)
    factors = [rule.lr_factor(it) for it in range(20, 30)]
    assert factors[0] == 1.0 and all(a > b > 0 for a, b in zip(factors, factors[1:], strict=False))
    assert not rule.finished(29) and rule.finished(30)
    assert not rule.update(flat[2], 30) or rule.found == 20   # the plateau stays where it was
    assert rule.found == 20


def test_the_state_survives_a_checkpoint():
    rule = Plateau(patience=2)
    evals = _evaluations([0.0] * 4, 1.0, 0.1)
    for i in range(3):
        assert not rule.update(evals[i], 10 * (i + 1))
    again = Plateau(patience=2)
    again.load_state_dict(rule.state_dict())
    assert again.update(evals[3], 40) == rule.update(evals[3], 40) is True
    assert (again.found, again.length) == (rule.found, rule.length) == (40, 40)


def test_a_run_stopped_by_the_rule_resumes_to_the_same_weights(tmp_path):
    """A zero reward: the base is already optimal (nothing moves), so the rule finds the plateau
    at the first full pair of windows (iteration 8: evaluations at 2, 4 against 6, 8) and decays
    over 8 more; a run killed before that resumes to the same stopping iteration and weights."""
    problem = load_problem("bimodal")
    cfg = cfg_for("pathwise", w=(0.0, 0.0), iterations=200, stop="plateau", eval_every=2,
                  patience=2, stop_trajectories=64, checkpoint_every=50)
    straight = finetune_toy2d(problem, cfg, tmp_path / "straight", progress=False)
    assert straight["converged"] and straight["iterations"] == 16
    killed = finetune_toy2d(problem, cfg, tmp_path / "killed", progress=False, stop_after=3)
    assert killed["stopped_at"] == 3
    resumed = finetune_toy2d(problem, cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed["iterations"] == 16 and resumed["converged"]
    a = load_file(tmp_path / "straight" / "expert.safetensors")
    b = load_file(tmp_path / "killed" / "expert.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "killed" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 17))
    again = finetune_toy2d(problem, cfg, tmp_path / "killed", resume=True, progress=False)
    assert again["iterations"] == 16   # a converged run stays converged
