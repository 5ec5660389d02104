"""``dblend bench amortised``: the relative error's definition and the command's contract."""

import json

import pytest

from diffusion_blend.bench.amortised import relative_error
from diffusion_blend.cli import main


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
def test_the_bench_reports_every_lambda_on_paired_seeds(capsys):
    assert main(["bench", "amortised", "--lams", "0.5,1", "--n", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["max_rel_error_by_lam"]) == {"0.5", "1"} and out["time_vs_single"] > 0
    for lam, rows in out["rows"].items():
        assert [r["w"][0] for r in rows] == out["w_grid"]
        assert out["max_rel_error_by_lam"][lam] == relative_error(rows)
        # paired on the same seeds: the mean difference is the difference of the means
        assert all(r["diff"] == pytest.approx(r["amortised"] - r["db_mpa"]) for r in rows)
