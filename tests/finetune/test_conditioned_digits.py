"""conditioned-rl: one preference-conditioned digits adapter fine-tuned directly, a preference
drawn per trajectory from its own seed; saved in the amortised blend's format."""

import shutil

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains.digits import PAIR, SPEC, DigitsDomain
from diffusion_blend.domains.images import conditioned_name, load_base
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.finetune.conditioned_digits import (
    make_task,
    preferences_for,
    train_conditioned,
)
from diffusion_blend.finetune.config import preset


def test_each_trajectory_draws_its_preference_from_its_own_seed():
    both = preferences_for([11, 12], 2)
    assert torch.equal(both[1:], preferences_for([12], 2))       # any batch, any order
    lam = both[:, -1]
    assert torch.allclose(both[:, :2].sum(1), lam) and ((lam >= 0) & (lam <= 2)).all()


def test_the_reward_is_lam_w_dot_r_per_trajectory():
    model, _ = load_base(SPEC)
    rewards = [lambda x0, y=None: x0.flatten(1).mean(1), lambda x0, y=None: -x0.flatten(1).std(1)]
    task, _ = make_task(model, rewards, preset("images-pathwise", stop="budget"))
    x0 = torch.randn(3, 1, 8, 8)
    cond = task.conditioning([1, 2, 3])
    r = torch.stack([f(x0) for f in rewards], 1)
    assert torch.allclose(task.reward(x0, **cond), (r * cond["pref"][:, :2]).sum(1))
    # the policy starts as the base: its LoRA's B and its embedding's last layer are zero
    t = torch.full((3,), 500)
    assert torch.equal(task.policy(x0, t, **cond), task.reference(x0, t, **cond))


@pytest.mark.slow
def test_a_trained_adapter_is_served_as_the_conditioned_rl_method(tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(SPEC.weights_dir, weights, ignore=shutil.ignore_patterns("conditioned_*"))
    cfg = preset("images-pathwise", stop="budget", iterations=2, batch_size=4, checkpoint_every=1,
                 eval_trajectories=8)
    meta = train_conditioned(weights, weights / "experts", cfg, progress=False)
    assert meta["pair"] == list(PAIR)
    assert (weights / "experts" / f"{conditioned_name(SPEC)}.json").exists()
    domain = DigitsDomain(PAIR, weights_dir=weights)
    out = run_method("conditioned-rl", domain, Preference((0.3, 0.7)), [0, 1, 2])
    assert out.nfe_per_sample == SPEC.steps and out.x0.shape == (3, 1, 8, 8)   # one network a step
    shipped = run_method("conditioned-rl", DigitsDomain(PAIR), Preference((0.3, 0.7)), [0, 1, 2])
    assert not torch.equal(shipped.x0, out.x0)     # the shipped adapter, not this 2-step one
