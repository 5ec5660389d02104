"""The sweep harness on toy2d (exact experts, a short chain): rows, resume, matching, report."""

import json
import shutil

import pytest
import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation import sweep as sweep_mod
from diffusion_blend.evaluation.report import load_sweep, summarise, write_report
from diffusion_blend.evaluation.sweep import (
    DEFAULT_METHODS,
    SweepConfig,
    matched_lam,
    run_sweep,
    w_points,
)

CFG = dict(domain="toy2d", spec="bimodal", w_grid="0:1:0.5", seeds=64, steps=20,
           lam_grid=(0.5, 2.0), methods=(*DEFAULT_METHODS, "smc"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    run_sweep(SweepConfig(**CFG), out, progress=False)
    return out


def _rows(out):
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_rows_cover_every_method_and_vertices_agree(swept):
    rows = _rows(swept)
    for m in ("pretrained", "db-mpa", "db-mpa-ls", "soup", "code", "rgg", "morl"):
        assert f"main|{m}|w=0.5,0.5|lam=1" in rows
    vertex = [rows[f"main|{m}|w=1,0|lam=1"] for m in ("db-mpa", "soup", "morl")]
    assert all(v["rewards"] == vertex[0]["rewards"] for v in vertex)  # all are expert 1 there
    assert rows["kla|db-kla|w=1,0|lam=0"]["rewards"] == rows["main|pretrained|w=1,0|lam=1"][
        "rewards"]
    assert {"matched|db-mpa|w=0.5,0.5", "matched|soup|w=0.5,0.5"} <= rows.keys()
    assert rows["matched|rgg|w=0.5,0.5"]["gamma"] > 0 and "grid|rgg|w=0.5,0.5|lam=1|gamma=0.01" \
        in rows
    smc = rows["main|smc|w=0.5,0.5|lam=1"]
    assert smc["cost"]["nfe_per_sample"] == 8 * (20 + 19 * 2) and "path_kl" not in smc
    row = rows["main|code|w=0.5,0.5|lam=1"]
    assert row["cost"]["nfe_per_sample"] == 4 * 20 + 4 * 4 and "path_kl" not in row
    assert rows["main|db-mpa|w=0.5,0.5|lam=1"]["cost"]["params"] == 2 * 14  # two mixtures


def test_the_blend_tracks_the_exact_target_better_than_the_pretrained_model(swept):
    rows = _rows(swept)
    blend, pre = rows["main|db-mpa|w=0.5,0.5|lam=1"], rows["main|pretrained|w=0.5,0.5|lam=1"]
    assert blend["target"]["energy_distance"] < pre["target"]["energy_distance"]


def test_matched_lambda_reaches_morls_path_kl(swept):
    rows = _rows(swept)
    morl = rows["main|morl|w=0.5,0.5|lam=1"]
    m = rows["matched|db-mpa|w=0.5,0.5"]
    assert m["path_kl"] == pytest.approx(morl["path_kl"], rel=0.15)


def test_resume_skips_finished_rows_and_drops_a_torn_line(swept, monkeypatch):
    before = (swept / "results.jsonl").read_text()
    with (swept / "results.jsonl").open("a") as f:
        f.write('{"key": "torn')
    calls = []
    monkeypatch.setattr(sweep_mod, "measure_row", lambda *a, **k: calls.append(a) or {})
    run_sweep(SweepConfig(**CFG), swept, progress=False)
    assert calls == [] and (swept / "results.jsonl").read_text() == before
    with pytest.raises(UsageError, match="differs in seeds"):
        run_sweep(SweepConfig(**(CFG | {"seeds": 65})), swept, progress=False)


def test_a_removed_row_is_recomputed_identically(swept, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    rows = _rows(out)
    key = "main|soup|w=0.5,0.5|lam=1"
    kept = [json.dumps(r) for k, r in rows.items() if k != key]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    run_sweep(SweepConfig(**CFG), out, progress=False)
    again = _rows(out)[key]
    assert again["rewards"] == rows[key]["rewards"] and again["path_kl"] == rows[key]["path_kl"]


def test_report_and_summary(swept):
    summary = write_report(swept)
    for k in ("hypervolume", "reference_point", "r_w_ratio_to_morl", "mean_cost"):
        assert k in summary
    assert summary["r_w_ratio_to_morl"]["morl"] == pytest.approx(1.0)
    assert summary["hypervolume"]["pretrained"] == 0.0   # the reference point is its rewards
    for f in ("report.md", "pareto.png", "rw_ratio.png", "kla.png", "summary.json"):
        assert (swept / f).stat().st_size > 0
    cfg, rows = load_sweep(swept)
    assert summarise(cfg, rows, [-100.0, -100.0])["hypervolume"]["db-mpa"] > 0


def test_matched_lam_inverts_a_quadratic_kl():
    pts = [(lam, 0.3 * lam**2) for lam in (0.5, 1.0, 2.0)]
    assert matched_lam(pts, 0.3 * 1.3**2, 4.0) == pytest.approx(1.3)
    assert matched_lam(pts, 0.3 * 3.0**2, 4.0) == pytest.approx(3.0)   # extrapolated
    assert matched_lam(pts, 0.3 * 9.0**2, 4.0) == 4.0                  # clamped


def test_bad_config_is_refused_before_anything_is_written(tmp_path):
    from diffusion_blend.evaluation.methods import MethodConfig

    with pytest.raises(UsageError, match="--particles 0"):
        MethodConfig(smc_particles=0)
    for bad, msg in (({"methods": ("nope",)}, "not known"),
                     ({"w_grid": "0:2:1"}, "in \\[0, 1\\]"),
                     ({"domain": "mnist"}, "'mnist'"), ({"seeds": 1}, "--seeds")):
        with pytest.raises(UsageError, match=msg):
            run_sweep(SweepConfig(**(CFG | bad)), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert w_points("0,1", 3)[0] == (1.0, 0.0, 0.0)


def test_paired_differences_against_db_mpa_on_the_same_seeds(swept):
    summary = write_report(swept)
    rows = _rows(swept)
    diff, matched = summary["paired_r_w_diff"], summary["paired_r_w_diff_matched_kl"]
    assert "db-mpa" not in diff and set(diff["soup"]) == {"0", "0.5", "1"}
    assert diff["soup"]["1"] == [0.0, 0.0]        # at a vertex the soup is the expert exactly
    # the mean of the paired differences is the difference of the means ...
    soup, mpa = rows["main|soup|w=0.5,0.5|lam=1"], rows["main|db-mpa|w=0.5,0.5|lam=1"]
    assert diff["soup"]["0.5"][0] == pytest.approx(soup["r_w"] - mpa["r_w"])
    # ... and pairing removes the seeds' shared noise: far tighter than the two intervals
    assert diff["soup"]["0.5"][1] < 0.5 * (soup["r_w_ci95"] ** 2
                                                 + mpa["r_w_ci95"] ** 2) ** 0.5
    assert set(matched) >= {"soup", "morl"} and set(matched["morl"]) == {"0.5"}
    assert "r_w minus DB-MPA's on the same seeds" in (swept / "report.md").read_text()
    # against MORL: the same pairs with the sign turned, and the matched rows against MORL
    vs_morl = summary["paired_r_w_diff_vs_morl"]
    assert "morl" not in vs_morl and vs_morl["db-mpa"]["0.5"][0] == pytest.approx(
        -diff["morl"]["0.5"][0]) and vs_morl["db-mpa"]["0.5"][1] == pytest.approx(
        diff["morl"]["0.5"][1])
    assert set(summary["paired_r_w_diff_vs_morl_matched_kl"]) >= {"db-mpa", "soup"}
    from diffusion_blend.evaluation.report import separation

    text = (swept / "report.md").read_text()
    assert "r_w minus MORL's on the same seeds" in text
    seeds = json.loads((swept / "sweep.json").read_text())["seeds"]
    for against, d in (("DB-MPA", diff), ("MORL", vs_morl)):   # the verdict under each table
        assert separation(d, against, seeds) in text


def test_smc_is_paired_through_its_runs_weighted_estimates(swept):
    """SMC's output is one particle drawn by the final weights, so each seed's weighted run
    estimate has the same expectation; pairing on it is what the report does, and it is
    tighter than pairing on the drawn particles."""
    from safetensors.torch import load_file

    from diffusion_blend.evaluation.sweep import rewards_path

    rows, summary = _rows(swept), write_report(swept)
    smc, mpa = rows["main|smc|w=0.5,0.5|lam=1"], rows["main|db-mpa|w=0.5,0.5|lam=1"]
    mean, ci = summary["paired_r_w_diff"]["smc"]["0.5"]
    w = torch.tensor(smc["w"], dtype=torch.float64)
    assert mean == pytest.approx(torch.tensor(smc["target_estimate"], dtype=torch.float64) @ w
                                 - mpa["r_w"])
    drawn = (load_file(rewards_path(swept, smc["key"]))["rewards"]
             - load_file(rewards_path(swept, mpa["key"]))["rewards"]) @ w
    assert ci < 1.96 * float(drawn.std() / len(drawn) ** 0.5)



def test_every_method_is_measured_against_the_target_smc_estimates(swept):
    """SMC's runs estimate the exact target's mean rewards (its closed-form check is in
    test_smc); the sweep measures every method against that estimate, so image domains get
    the toy2d distance's analogue. The pretrained model is the farthest; the blend is near."""
    rows = _rows(swept)
    smc = rows["main|smc|w=0.5,0.5|lam=1"]
    assert len(smc["target_estimate"]) == 2 and all(c > 0 for c in smc["target_estimate_ci95"])
    d = write_report(swept)["distance_to_smc_target"]
    assert d["db-mpa"] < d["pretrained"] and d["morl"] < d["pretrained"]
    assert d["db-mpa"] < 0.5 * d["pretrained"]
    assert "as SMC estimates it" in (swept / "report.md").read_text()


def test_the_soup_coincides_only_where_the_paired_interval_holds_zero():
    """Coincidence is read off the paired differences (same seeds), never at the vertices."""
    from diffusion_blend.evaluation.report import coincidences

    paired = {"soup": {"0": [0.0, 0.0], "0.25": [-0.05, 0.01], "0.5": [0.004, 0.01],
                       "1": [0.0, 0.0]}, "morl": {"0.25": [0.0, 0.02]}}
    assert coincidences(paired) == ["0.5"]
    assert coincidences(paired, "morl") == ["0.25"]
    assert coincidences({}) == []


def test_the_report_says_which_methods_separate_and_where_the_others_coincide():
    """Every method with an interior w is named once: apart (its interval excludes 0 at every
    interior w) or with the w at which it coincides; the vertices do not count."""
    from diffusion_blend.evaluation.report import separation

    paired = {"soup": {"0": [0.0, 0.0], "0.25": [-0.05, 0.01], "0.5": [-0.04, 0.01],
                       "1": [0.0, 0.0]},
              "code": {"0": [0.1, 0.3], "0.25": [0.01, 0.1], "0.5": [0.5, 0.1]},
              "smc": {"0.5": [0.1, 0.2], "0.25": [0.0, 0.2]}, "ends": {"1": [0.0, 0.0]}}
    assert separation(paired, "DB-MPA") == (
        "Separate from DB-MPA at every interior w: soup. Coincide with it within the paired "
        "CI: code at w[0] = 0.25; smc at w[0] = 0.25, 0.5.")
    assert separation({}, "MORL").endswith("every interior w: none. Coincide with it within "
                                           "the paired CI: nowhere.")
    with_seeds = separation(paired, "DB-MPA", 100)   # what more seeds would resolve
    assert ("code at w[0] = 0.25 (~10,000 seeds); smc at w[0] = 0.25 (no difference "
            "measured), 0.5 (~400 seeds)." in with_seeds) and "`100 (ci / |mean|)^2`" in with_seeds
    assert "seeds at which" not in separation({"soup": paired["soup"]}, "DB-MPA", 100)


@pytest.mark.parametrize("mean, ci, n", [(0.01, 0.1, 100), (-0.004, 0.0064, 128), (0.3, 0.1, 64)])
def test_seeds_to_resolve_is_where_the_shrinking_interval_first_clears_the_difference(mean, ci, n):
    """The 95% CI shrinks as ``1 / sqrt(n)``: at the named seed count it is within ``|mean|``,
    one seed fewer it is not."""
    from diffusion_blend.evaluation.report import seeds_to_resolve

    need = seeds_to_resolve(mean, ci, n)
    assert seeds_to_resolve(0.0, ci, n) is None
    assert ci * (n / need) ** 0.5 <= abs(mean) * (1 + 1e-12) < ci * (n / (need - 1)) ** 0.5


def test_a_domain_with_strata_gets_stratified_intervals(tmp_path, monkeypatch):
    """Seeds whose stratum (seed % 2) scales every reward by 5 and shifts it by 5, as a class
    fixed by the seed does: the per-method and paired intervals count only the spread within
    strata, recomputed here from the kept per-seed rewards; without strata they would include
    the stratum effects (the scale makes the paired differences differ by stratum too)."""
    from safetensors.torch import load_file

    from diffusion_blend.domains.toy2d import Toy2dDomain
    from diffusion_blend.evaluation.metrics import mean_and_stderr
    from diffusion_blend.evaluation.report import paired_r_w_diff
    from diffusion_blend.evaluation.sweep import rewards_path

    class Stratified(Toy2dDomain):
        def strata(self, seeds):
            return torch.tensor([s % 2 for s in seeds])

        def rewards(self, x0, **cond):
            odd = (torch.arange(len(x0)) % 2)[:, None]   # the sweep scores seeds 0..31 in order
            return super().rewards(x0) * (1 + 4 * odd) + 5.0 * odd

    monkeypatch.setattr(sweep_mod, "make_domain", lambda cfg, out: Stratified("bimodal", 10))
    cfg = SweepConfig(domain="toy2d", w_grid="0,0.5,1", seeds=32, steps=10, seed=0,
                      methods=("pretrained", "db-mpa", "soup"), match=False)
    out = run_sweep(cfg, tmp_path / "run", progress=False)
    rows = list(_rows(out).values())
    row = next(r for r in rows if r["key"] == "main|soup|w=0.5,0.5|lam=1")
    strata = torch.arange(32) % 2
    per_seed = {m: load_file(rewards_path(out, f"main|{m}|w=0.5,0.5|lam=1"))
                for m in ("soup", "db-mpa", "pretrained")}
    assert torch.equal(per_seed["soup"]["strata"].long(), strata)
    r_w = {m: per_seed[m]["rewards"] @ torch.tensor([0.5, 0.5], dtype=torch.float64)
           for m in per_seed}
    (_,), (se,) = mean_and_stderr(r_w["soup"][:, None], strata)
    (_,), (se_iid,) = mean_and_stderr(r_w["soup"][:, None])
    assert row["r_w_ci95"] == pytest.approx(1.96 * se) and se < se_iid / 1.5
    diff = (r_w["pretrained"] - r_w["db-mpa"])[:, None]
    (_,), (dse,) = mean_and_stderr(diff, strata)
    (_,), (dse_iid,) = mean_and_stderr(diff)
    ci = paired_r_w_diff(out, rows)["pretrained"]["0.5"][1]
    assert ci == pytest.approx(1.96 * dse) and ci != pytest.approx(1.96 * dse_iid, rel=0.01)
