import json

import pytest

from diffusion_blend.bench.finetune_suite import SUITE, bench_suite
from diffusion_blend.cli import main
from diffusion_blend.domains.toy2d import load_problem
from diffusion_blend.finetune.toy2d import closed_form


def test_the_suite_spans_what_the_issue_asks_and_excludes_the_tuning_specs():
    problems = {name: load_problem(spec) for name, (spec, _) in SUITE.items()}
    assert len(problems) >= 6
    modes = {len(p.mixture.weights) for p in problems.values()}
    dims = {p.mixture.dim for p in problems.values()}
    alphas = [p.alpha for p in problems.values()]
    kinds = {"+".join(r["type"] for r in s["rewards"]) for s, _ in SUITE.values()}
    assert {2, 5} <= modes and {2, 4} <= dims and min(alphas) == 0.3 and max(alphas) == 2.0
    assert {"linear", "quadratic", "linear+quadratic"} <= kinds
    for tuned in ("bimodal-linear", "bimodal", "trimodal-3d"):
        assert all(p.spec["mixture"] != load_problem(tuned).spec["mixture"]
                   for p in problems.values())
    for name, (_, w) in SUITE.items():   # every spec has something to gain
        cf = closed_form(problems[name], w)
        assert cf["optimum_objective"] - cf["pretrained_objective"] > 0.05, name


def test_suite_flags_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "s"
    for argv in (["--suite", "--spec", "bimodal"], ["--suite", "--resume", "--overwrite"],
                 ["--suite", "--resume"], ["--resume"]):
        assert main(["bench", "finetune-toy2d", "--out", str(out), *argv]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_quick_suite_runs_every_spec_and_resume_reads_it_back(tmp_path):
    first = bench_suite(tmp_path / "s", quick=True)
    assert len(first["rows"]) == 2 * len(SUITE)
    assert {r["estimator"] for r in first["rows"]} == {"pathwise", "dpok"}
    again = bench_suite(tmp_path / "s", resume=True, quick=True)
    assert again == first == json.loads((tmp_path / "s" / "result.json").read_text())
