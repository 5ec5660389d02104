import json

import pytest

from diffusion_blend.cli import main
from diffusion_blend.domains.digits import SPEC


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_toy2d_sample_json(capsys, tmp_path):
    rc, out, _ = run(capsys, "sample", "toy2d", "--spec", "bimodal-linear", "--w", "0.25,0.75",
                     "--n", "300", "--steps", "50", "--json", "--out", str(tmp_path / "o"))
    assert rc == 0
    res = json.loads(out)
    for key in ("method", "w", "lam", "n", "nfe_per_sample", "mean_rewards", "stderr_rewards",
                "target_mean_rewards", "target_log_z", "energy_distance", "seconds"):
        assert key in res
    assert res["nfe_per_sample"] == 100 and res["w"] == [0.25, 0.75]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".dblend-output.json", "config.json", "result.json", "samples.safetensors", "scatter.png"]
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["spec"]["rewards"][1] == {"type": "linear", "a": [0, 1]}


def test_spec_from_a_json_file(capsys, tmp_path):
    from diffusion_blend.domains.toy2d import PRESETS

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(PRESETS["gaussian"]))
    rc, out, _ = run(capsys, "sample", "toy2d", "--spec", str(path), "--method", "exact",
                     "--n", "200", "--json")
    assert rc == 0 and json.loads(out)["nfe_per_sample"] == 0


@pytest.mark.parametrize("args, match", [
    (["--w", "1,2,3"], "3 weights"),
    (["--w", "nan,1"], "NaN"),
    (["--lam", "inf"], "NaN or inf"),
    (["--lam", "-1"], "lam=-1.0"),
    (["--lam", "2"], "--allow-extrapolation"),
    (["--w=-0.5,1.5"], "--allow-extrapolation"),
    (["--n", "0"], "--n: '0'"),
    (["--steps", "0"], "--steps: '0'"),
    (["--spec", "nope"], "preset"),
    (["--method", "magic"], "'magic'"),
    (["--sampler", "euler"], "'euler'"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, args, match):
    out_dir = tmp_path / "never"
    rc, out, err = run(capsys, "sample", "toy2d", "--n", "10", "--steps", "5", *args,
                       "--out", str(out_dir))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and match in err
    assert not out_dir.exists()


def test_extrapolation_when_asked(capsys):
    rc, out, _ = run(capsys, "sample", "toy2d", "--spec", "gaussian", "--w=-0.5,1.5",
                     "--lam", "2", "--allow-extrapolation", "--n", "50", "--steps", "10", "--json")
    assert rc == 0 and json.loads(out)["lam"] == 2.0


def test_refuses_non_empty_out(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    rc, _, err = run(capsys, "sample", "toy2d", "--n", "10", "--steps", "5",
                     "--out", str(tmp_path))
    assert rc == 2 and "not empty" in err and "--overwrite" in err


def test_gap_and_demo_write_their_files(capsys, tmp_path):
    rc, _, _ = run(capsys, "gap", "toy2d", "--n", "200", "--steps", "20", "--divisions", "2",
                   "--out", str(tmp_path / "gap"))
    assert rc == 0
    assert {"gap.png", "gap.md", "gap.json"} <= {p.name for p in (tmp_path / "gap").iterdir()}
    from diffusion_blend.evaluation.toy2d import run_demo

    out = run_demo(tmp_path / "demo", n=200, steps=20, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "gap_bimodal.png", "gap_bimodal-linear.md",
            "scatter_bimodal_db-mpa_w0.50.png", "scatter_bimodal_exact_w0.50.png"} <= names
    report = (out / "report.md").read_text()
    assert report.count("| w |") == 2 and "standard errors" in report


def test_blend_ls_runs_one_network_per_step(capsys):
    rc, out, _ = run(capsys, "sample", "toy2d", "--method", "db-mpa-ls", "--w", "0.5,0.5",
                     "--lam", "0.5", "--n", "100", "--steps", "30", "--json")
    assert rc == 0 and json.loads(out)["nfe_per_sample"] == 30


def test_finetune_then_blend_learned_experts(capsys, tmp_path):
    common = ["--iterations", "2", "--batch-size", "16", "--sample-steps", "30",
              "--eval-trajectories", "200", "--json"]
    for i, w in enumerate(["1,0", "0,1"]):
        rc, out, err = run(capsys, "finetune", "toy2d", "--spec", "bimodal-linear", "--w", w,
                           "--out", str(tmp_path / f"e{i}"), *common)
        assert rc == 0, err
        res = json.loads(out)
        for key in ("mean_rewards", "path_kl", "objective", "optimum_objective",
                    "pretrained_objective", "gain_ratio", "seconds"):
            assert key in res
        assert abs(res["objective"] - (res["mean_rewards"][i] - res["path_kl"])) < 1e-6
    experts = f"{tmp_path / 'e0'},{tmp_path / 'e1'}"
    rc, out, err = run(capsys, "sample", "toy2d", "--spec", "bimodal-linear", "--experts",
                       experts, "--w", "0.5,0.5", "--n", "100", "--steps", "30", "--json")
    assert rc == 0, err
    assert json.loads(out)["target_coefficients"] == [0.5, 0.5]
    # one fine-tuned model: DB-MPA at w = 1 is that model alone (the base is not evaluated)
    rc, out, err = run(capsys, "sample", "toy2d", "--spec", "bimodal-linear", "--experts",
                       str(tmp_path / "e1"), "--w", "1", "--n", "50", "--steps", "30", "--json")
    res = json.loads(out)
    assert rc == 0 and res["target_coefficients"] == [0.0, 1.0] and res["nfe_per_sample"] == 30
    rc, out, err = run(capsys, "sample", "toy2d", "--spec", "bimodal-linear", "--experts",
                       str(tmp_path / "e1"), "--w", "1", "--lam", "0.5", "--n", "50", "--steps",
                       "30", "--json")   # DB-KLA of that model
    res = json.loads(out)
    assert rc == 0 and res["target_coefficients"] == [0.0, 0.5] and res["nfe_per_sample"] == 60
    # an expert trained on another base is refused
    rc, _, err = run(capsys, "sample", "toy2d", "--spec", "gaussian", "--experts", experts,
                     "--n", "10", "--steps", "5")
    assert rc == 2 and "another base" in err
    weights = tmp_path / "e0" / "expert.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3] + b"bad")
    rc, _, err = run(capsys, "sample", "toy2d", "--spec", "bimodal-linear", "--experts",
                     experts, "--n", "10", "--steps", "5")
    assert rc == 2 and "corrupt" in err and "expert.safetensors" in err


@pytest.mark.parametrize("args, match", [
    (["--estimator", "reinforce"], "reinforce"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-2"], "alpha"),
    (["--w", "1,0,0"], "3 weights"),
    (["--resume"], "no run"),
])
def test_finetune_bad_input(capsys, tmp_path, args, match):
    rc, out, err = run(capsys, "finetune", "toy2d", "--out", str(tmp_path / "r"),
                       "--iterations", "1",
                       *args)
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, match", [
    (["--class", "10"], "0-9"),
    (["--class", "x"], "0-9"),
    (["--experts", "ink,beauty"], "beauty"),
    (["--experts", "ink,symmetry", "--w", "0.2,0.3,0.5"], "3 weights"),
    (["--lam", "nan"], "NaN"),
    (["--out", "grid.jpg"], ".png"),
    (["--steps", "0"], "--steps"),
    (["--weights", "/nonexistent/w"], "train-base digits"),
])
def test_sample_digits_bad_input(capsys, args, match):
    rc, out, err = run(capsys, "sample", "digits", "--n", "2", *args)
    assert rc == 2 and match in err and err.count("\n") == 1 and out == ""


def test_sample_digits_json_and_png(capsys, tmp_path):
    rc, out, err = run(capsys, "sample", "digits", "--class", "3", "--w", "0.3,0.7", "--n", "4",
                       "--json", "--out", str(tmp_path / "g.png"))
    assert rc == 0, err
    res = json.loads(out)
    assert res["nfe_per_sample"] == 2 * SPEC.steps and res["reward_names"] == ["ink", "smooth"]
    assert len(res["mean_rewards"]) == len(res["stderr_rewards"]) == 2 and res["class"] == 3
    assert (tmp_path / "g.png").stat().st_size > 0
    rc, out, err = run(capsys, "sample", "digits", "--n", "2", "--steps", "3", "--json")
    assert rc == 0 and json.loads(out)["nfe_per_sample"] == 6   # two per step, three steps


def test_demo_refuses_non_empty_out(capsys, tmp_path):
    (tmp_path / "x").write_text("keep")
    rc, _, err = run(capsys, "demo", "--out", str(tmp_path))
    assert rc == 2 and "--overwrite" in err


def test_bench_experts_refuses_a_weights_dir_without_adapters(capsys, tmp_path):
    rc, out, err = run(capsys, "bench", "experts", "--weights", str(tmp_path))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "no fine-tuned adapters" in err


def test_the_spacing_flag_offers_the_schedules_spacings():
    from diffusion_blend.cli.args import SPACING
    from diffusion_blend.sampling import SPACINGS

    assert SPACING[1]["choices"] == SPACINGS
