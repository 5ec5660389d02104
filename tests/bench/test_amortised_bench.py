"""``dblend bench amortised``: the relative error's definition and the command's contract."""

import json

import pytest

from diffusion_blend.bench.amortised import relative_error
from diffusion_blend.blend import Preference
from diffusion_blend.cli import main
from diffusion_blend.domains.digits import PAIR, SPEC, DigitsDomain
from diffusion_blend.evaluation.methods import run_method


def test_the_error_is_the_largest_paired_gap_over_db_mpas_range():
    rows = [{"db_mpa": 0.0, "diff": 0.01}, {"db_mpa": 2.0, "diff": -0.05},
            {"db_mpa": 1.0, "diff": 0.02}]
    assert relative_error(rows) == pytest.approx(0.05 / 2.0)


@pytest.mark.parametrize("lams", ["0", "2.5", "1,nan"])
def test_lambdas_outside_the_training_range_are_refused(lams, capsys):
    assert main(["bench", "amortised", "--lams", lams, "--n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lams" in err[0]


@pytest.mark.slow
def test_the_shipped_blend_tracks_db_mpa_on_paired_seeds_at_one_nfe_per_step(capsys):
    """On the shipped digits weights, at both ends of the lambda range it was distilled on, the
    amortised blend's ``r_w`` stays within 5% of DB-MPA's range over the w grid (the paired gap's
    95% upper bound), at one network evaluation per step; the bench reports every lambda."""
    assert main(["bench", "amortised", "--lams", "0.5,1.5", "--n", "60", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["max_rel_error_by_lam"]) == {"0.5", "1.5"} and out["time_vs_single"] > 0
    for lam, rows in out["rows"].items():
        assert [r["w"][0] for r in rows] == out["w_grid"]
        assert out["max_rel_error_by_lam"][lam] == relative_error(rows)
        # paired on the same seeds: the mean difference is the difference of the means
        assert all(r["diff"] == pytest.approx(r["amortised"] - r["db_mpa"]) for r in rows)
        spread = max(r["db_mpa"] for r in rows) - min(r["db_mpa"] for r in rows)
        assert spread > 0.5
        assert max(abs(r["diff"]) + 1.96 * r["diff_se"] for r in rows) <= 0.05 * spread
    pair = DigitsDomain(PAIR)
    assert run_method("amortised", pair, Preference((0.5, 0.5)), [0, 1]).nfe_per_sample == \
        SPEC.steps
