"""The optimum estimated by SMC against toy2d's closed forms."""

from diffusion_blend.blend import Preference
from diffusion_blend.domains.toy2d import Toy2dDomain
from diffusion_blend.evaluation.optimum import gain_ratio
from diffusion_blend.finetune.toy2d import closed_form
from tests.conftest import z_ok


def test_the_smc_optimum_and_the_gain_ratio_match_the_closed_forms():
    """The exact expert of r1: SMC's log Z equals the closed form, and the gain ratio computed
    from it equals the one from the closed-form optimum (both near 1: it is the optimum)."""
    domain = Toy2dDomain("bimodal-linear")
    w = (1.0, 0.0)
    res = gain_ratio(domain, domain.experts[0], lambda x0, **_: domain.rewards(x0)[:, 0],
                     domain.alpha, n=1024, runs=32, particles=16)
    cf = closed_form(domain.problem, w)
    assert z_ok(res["log_z"], domain.target(Preference(w)).log_z, res["log_z_se"])
    room = cf["optimum_objective"] - cf["pretrained_objective"]
    closed = (res["objective"] - cf["pretrained_objective"]) / room
    assert z_ok(res["gain_ratio"], closed, res["gain_ratio_se"])
    assert z_ok(closed, 1.0, res["objective_se"] / room)
    assert res["gain_ratio_se"] < 0.1 and res["path_kl"] > 0.3
