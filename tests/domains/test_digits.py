import json
import shutil
from dataclasses import replace

import pytest
import torch

from diffusion_blend.blend import BlendedDenoiser, Preference
from diffusion_blend.domains import digits
from diffusion_blend.domains.digits import SPEC, DigitsDomain
from diffusion_blend.domains.images import BaseConfig, load_base
from diffusion_blend.errors import UsageError
from diffusion_blend.evaluation.images import frechet_distance, run_train_base
from diffusion_blend.finetune.images import run_train_experts

TINY = replace(SPEC, classifier_config={"epochs": 1})   # the recipe, shortened
OTHER = "linear" if SPEC.spacing == "quadratic" else "quadratic"
ANOTHER = replace(SPEC, spacing=OTHER)                       # experts on another chain


def test_data_split_is_disjoint_and_scaled():
    d = digits.load_data()
    assert d["train_x"].shape[1:] == (1, 8, 8) and len(d["train_x"]) + len(d["test_x"]) == 1797
    assert d["train_x"].min() == -1.0 and d["train_x"].max() == 1.0
    again = digits.load_data()
    assert torch.equal(d["test_y"], again["test_y"])


def test_frechet_distance_zero_for_same_set_positive_for_shift():
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-6
    assert abs(frechet_distance(x, x + 1.0) - 5.0) < 1e-6  # |mu shift|^2, same covariance


@pytest.fixture(scope="module", autouse=True)
def small_evaluations():
    """The experts' preset with small batches and evaluations (the same for every run here:
    a resume compares configs)."""
    from diffusion_blend.finetune.config import PRESETS

    small = {"batch_size": 4, "eval_trajectories": 8, "stop_trajectories": 8}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "images-pathwise", PRESETS["images-pathwise"] | small)
        yield


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """The real recipes, shortened: 3 base iterations, 1 classifier epoch, 1 expert step."""
    root = tmp_path_factory.mktemp("recipe")
    cfg = BaseConfig(iterations=3)
    run_train_base(TINY, root / "w", cfg, progress=False, quality_per_class=2)
    run_train_experts(ANOTHER, root / "w", root / "w" / "experts", iterations=1, progress=False,
                      only=["ink", "symmetry"], stop="plateau", steps=3)
    return root


@pytest.mark.slow
def test_shortened_recipe_is_deterministic_and_loadable(tiny_recipe, tmp_path):
    cfg = BaseConfig(iterations=3)
    run_train_base(TINY, tmp_path / "again", cfg, progress=False, quality_per_class=2)
    for name in ("base", "classifier", "judge"):
        a = json.loads((tiny_recipe / "w" / f"{name}.json").read_text())["sha256"]
        b = json.loads((tmp_path / "again" / f"{name}.json").read_text())["sha256"]
        assert a == b, name  # same seed -> the same weights, bit for bit
    dom = DigitsDomain(["ink", "symmetry"], weights_dir=tiny_recipe / "w")
    base, experts = dom.base, dom.experts
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    y = torch.arange(4)
    # lam = 0 is the base, w = e_i is expert i: exactly, in both blends
    for blend in (dom.blend, lambda p: BlendedDenoiser(base, experts, p)):
        assert torch.equal(blend(Preference((0.3, 0.7), 0.0))(x, t, y=y), base(x, t, y=y))
        assert torch.equal(blend(Preference((0.0, 1.0)))(x, t, y=y), experts[1](x, t, y=y))
    base_json = json.loads((tiny_recipe / "w" / "base.json").read_text())
    assert dom.metas["ink"]["base_sha256"] == base_json["sha256"]
    assert dom.metas["ink"]["config"]["stop"] == "plateau"   # --stop reaches the recipe
    assert dom.metas["ink"]["config"]["sample_steps"] == 3   # so does --steps
    assert dom.metas["ink"]["spacing"] == OTHER              # and --spacing


def test_loader_refuses_other_base_missing_and_corrupt_files(tiny_recipe, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_recipe / "w", other)
    run_train_base(TINY, other, BaseConfig(iterations=2, seed=5), overwrite=True,
                   progress=False, quality_per_class=1)
    shutil.copytree(tiny_recipe / "w" / "experts", other / "experts", dirs_exist_ok=True)
    with pytest.raises(UsageError, match="another base"):
        DigitsDomain(["ink"], weights_dir=other)
    with pytest.raises(UsageError, match="missing.*finetune digits"):
        DigitsDomain(["crisp"], weights_dir=tiny_recipe / "w")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_recipe / "w", broken)
    p = broken / "base.safetensors"
    p.write_bytes(p.read_bytes()[:-4] + b"oops")
    with pytest.raises(UsageError, match="corrupt.*train-base"):
        load_base(SPEC, broken)


@pytest.mark.slow
def test_recipe_resume_continues_each_begun_run_and_refuses_another_config(tiny_recipe,
                                                                          tmp_path):
    w = tmp_path / "w"
    shutil.copytree(tiny_recipe / "w", w)
    kw = dict(iterations=1, progress=False, stop="plateau", steps=3, resume=True)
    ink = json.loads((w / "experts" / "ink.json").read_text())
    again = run_train_experts(ANOTHER, w, w / "experts", only=["ink", "crisp"], **kw)
    assert again["ink"]["sha256"] == ink["sha256"]       # the finished run, the same weights
    assert (w / "experts" / "runs" / "crisp" / "config.json").is_file()   # not begun: fresh
    stamp = (w / "experts" / "rewards.json").stat().st_mtime_ns
    with pytest.raises(UsageError, match="config differs"):   # a resume, not a restart
        run_train_experts(SPEC, w, w / "experts", only=["ink"], **kw)   # another spacing
    assert (w / "experts" / "rewards.json").stat().st_mtime_ns == stamp   # refused before it


def test_class_outside_range():
    with pytest.raises(UsageError, match="0-9"):
        SPEC.check_class(10)
    assert SPEC.check_class("7") == 7
