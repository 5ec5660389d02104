import json
import math
import shutil

import pytest

from diffusion_blend.bench.experts import bench_experts, shipped
from diffusion_blend.domains.digits import SPEC

pytestmark = pytest.mark.slow


def _ink_only(root, edit=None):
    """A weights directory holding the shipped base, classifier, judge and the ink expert only
    (its metadata changed by ``edit``): one adapter to measure instead of every shipped one."""
    (root / "experts").mkdir(parents=True)
    for f in ("base", "classifier", "judge"):
        for ext in ("json", "safetensors"):
            (root / f"{f}.{ext}").symlink_to(SPEC.weights_dir / f"{f}.{ext}")
    for f in ("rewards.json", "ink.safetensors"):
        shutil.copy(SPEC.weights_dir / "experts" / f, root / "experts" / f)
    meta = json.loads((SPEC.weights_dir / "experts" / "ink.json").read_text())
    (root / "experts" / "ink.json").write_text(json.dumps(edit(meta) if edit else meta))
    return root


def test_every_shipped_fine_tune_is_measured_against_the_optimum(capsys):
    """Every shipped adapter gets a row (on a short chain here: the subject is the rows), with
    a progress bar over the adapters."""
    out = bench_experts(n=16, runs=2, particles=2, steps=6, domain_name="digits", progress=True)
    names = shipped(SPEC.weights_dir)
    err = capsys.readouterr().err
    assert "adapters: 100%|" in err and f"{len(names)}/{len(names)}" in err
    assert set(out["experts"]) == set(names) and "ink" in names and "morl_ink_smooth_w050" in names
    for row in out["experts"].values():
        assert all(math.isfinite(row[k]) for k in ("gain_ratio", "gain_ratio_se", "log_z",
                                                   "log_z_se", "path_kl", "optimum_path_kl",
                                                   "optimum_path_kl_se"))
        assert row["optimum"] == row["alpha"] * row["log_z"] and row["path_kl"] > 0
        assert 0 <= row["judge_agreement"] <= 1 and row["steps"] == 6
    assert out["pretrained_judge_agreement"] > 0.5   # the base draws the prompted digits
    assert out["steps"] == 6


def test_the_chain_length_is_the_one_asked_for(tmp_path):
    """More steps, another chain: the pretrained objective moves, the adapters stay measured."""
    w = _ink_only(tmp_path / "w")
    short = bench_experts(n=16, runs=2, particles=2, steps=4, weights_dir=w)["experts"]["ink"]
    long = bench_experts(n=16, runs=2, particles=2, steps=8, weights_dir=w)["experts"]["ink"]
    assert short["pretrained_objective"] != long["pretrained_objective"]


def test_each_adapter_is_measured_on_the_chain_it_was_trained_on(tmp_path):
    other = "linear" if SPEC.spacing == "quadratic" else "quadratic"

    def another_chain(meta):
        meta["config"]["sample_steps"], meta["spacing"] = 5, other
        return meta

    row = bench_experts(n=16, runs=2, particles=2,
                        weights_dir=_ink_only(tmp_path / "w", another_chain))["experts"]["ink"]
    assert (row["steps"], row["spacing"]) == (5, other)
    shipped_row = bench_experts(n=16, runs=2, particles=2,
                                weights_dir=_ink_only(tmp_path / "s"))["experts"]["ink"]
    assert (shipped_row["steps"], shipped_row["spacing"]) == (SPEC.steps, SPEC.spacing)
    assert row["pretrained_objective"] != shipped_row["pretrained_objective"]
