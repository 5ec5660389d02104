"""The optimum estimated by SMC against toy2d's closed forms, unconditional and prompted."""

import math

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.domains.toy2d import Toy2dDomain
from diffusion_blend.evaluation.optimum import (
    condition_groups,
    gain_ratio,
    optimum_estimates,
)
from diffusion_blend.finetune.toy2d import closed_form
from tests.conftest import z_ok

W = (1.0, 0.0)


class Prompted(Toy2dDomain):
    """toy2d with a prompt ``c`` = seed mod 3 that the reward reads and no model sees."""

    def cond(self, seeds: list[int]) -> dict:
        return {"c": torch.tensor([s % 3 for s in seeds], dtype=torch.float64)}

    def strata(self, seeds: list[int]) -> torch.Tensor:
        return torch.tensor([s % 3 for s in seeds])


def measure(domain: Toy2dDomain, shift: float) -> dict:
    """The exact expert of r1 on the reward ``r1 + shift * c`` (``c`` = 0 without prompts)."""
    def reward(x0, c=None, **_):
        return domain.rewards(x0)[:, 0] + (0.0 if c is None else shift * c)
    return gain_ratio(domain, domain.experts[0], reward, domain.alpha, n=1024, runs=32,
                      particles=16)


def test_the_smc_optimum_and_the_gain_ratio_match_the_closed_forms():
    """The exact expert of r1: SMC's log Z equals the closed form, the gain ratio computed from
    it equals the one from the closed-form optimum (both near 1: it is the optimum), and the
    optimum's path KL (``E*[r] / alpha - log Z``) the tilted target's."""
    domain = Toy2dDomain("bimodal-linear")
    res = measure(domain, 0.0)
    cf = closed_form(domain.problem, W)
    assert z_ok(res["log_z"], domain.target(Preference(W)).log_z, res["log_z_se"])
    room = cf["optimum_objective"] - cf["pretrained_objective"]
    closed = (res["objective"] - cf["pretrained_objective"]) / room
    assert z_ok(res["gain_ratio"], closed, res["gain_ratio_se"])
    assert z_ok(closed, 1.0, res["objective_se"] / room)
    assert res["gain_ratio_se"] < 0.1 and res["path_kl"] > 0.3
    assert z_ok(res["optimum_path_kl"], cf["target_kl"], res["optimum_path_kl_se"])
    assert res["optimum_path_kl_se"] < 0.1 * cf["target_kl"]


def test_a_prompted_optimum_is_met_per_prompt():
    """A reward offset by the prompt (``r1 + 4 alpha c``) that no model can change: the
    optimum is ``alpha log Z + 4 alpha E[c]`` (``E_c[alpha log Z_c]``), not the Jensen-larger
    ``alpha log E_c[Z_c]``, the exact expert still reaches it (gain ratio 1), and the optimum's
    path KL is the unprompted one. The seed fixes the prompt, so the objective's standard error
    counts only the spread within a prompt: the offset leaves it as it is."""
    domain = Prompted("bimodal-linear")
    shift, alpha = 4 * domain.alpha, domain.alpha
    res = measure(domain, shift)
    c = domain.cond(list(range(1024)))["c"]
    log_z = domain.target(Preference(W)).log_z + shift / alpha * float(c.mean())
    jensen = (domain.target(Preference(W)).log_z
              + math.log(float(torch.exp(shift / alpha * c).mean())))
    assert z_ok(res["log_z"], log_z, res["log_z_se"])
    assert not z_ok(res["log_z"], jensen, res["log_z_se"])
    assert z_ok(res["gain_ratio"], 1.0, res["gain_ratio_se"]) and res["gain_ratio_se"] < 0.1
    # a constant per prompt does not change the tilted law: the optimum moves as far as without
    target_kl = closed_form(domain.problem, W)["target_kl"]
    assert z_ok(res["optimum_path_kl"], target_kl, res["optimum_path_kl_se"])
    assert res["objective_se"] == pytest.approx(measure(domain, 0.0)["objective_se"])


def test_the_tilted_mean_reweights_a_proposal_far_from_the_target():
    """The pretrained chain as the proposal (mean reward 0, the target's 2.2): the runs'
    importance weights, not the particles' plain mean, give the tilted law's mean reward."""
    domain = Toy2dDomain("bimodal-linear")
    cf = closed_form(domain.problem, W)
    res = optimum_estimates(domain, domain.base, lambda x0, **_: domain.rewards(x0)[:, 0],
                            domain.alpha, {}, 4, runs=64, particles=64, seed=7)
    assert z_ok(res["tilted_reward"], cf["target_mean_rewards"][0], res["tilted_reward_se"])
    assert z_ok(res["log_z"], domain.target(Preference(W)).log_z, res["log_z_se"])
    assert res["tilted_reward_se"] < 0.05 * cf["target_mean_rewards"][0]


def test_rows_with_equal_conditioning_share_a_condition():
    ids, first = condition_groups({"y": torch.tensor([2, 0, 2, 1, 0]), "scale": 3.0}, 5)
    assert ids.tolist() == [0, 1, 0, 2, 1] and first.tolist() == [0, 1, 3]
    ids, first = condition_groups({}, 4)
    assert ids.tolist() == [0, 0, 0, 0] and first.tolist() == [0]
