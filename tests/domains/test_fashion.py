"""Fashion-MNIST from IDX files: tiny synthetic files here (the Debian package is not needed)."""

import gzip

import numpy as np
import pytest
import torch

from diffusion_blend.domains.fashion import FILES, load_data, read_idx
from diffusion_blend.errors import UsageError


def write_idx(path, array, gz=True):
    a = np.asarray(array, dtype=np.uint8)
    head = bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    data = head + a.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 28, 28))
        x[0] = 255                                      # one flat (all garment) image
        write_idx(tmp_path / FILES[f"{split}_x"], x)
        write_idx(tmp_path / FILES[f"{split}_y"], rng.integers(0, 10, n))
    return tmp_path


def test_idx_files_read_back_exactly(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        write_idx(tmp_path / "a", a, gz)
        assert np.array_equal(read_idx(tmp_path / "a"), a)


def test_splits_are_scaled_to_minus_one_one_and_downsampled_by_area(root):
    full, small = load_data(root, 28), load_data(root, 16)
    raw = torch.from_numpy(read_idx(root / FILES["train_x"]).copy()).float()
    assert full["train_x"].shape == (6, 1, 28, 28) and small["test_x"].shape == (4, 1, 16, 16)
    assert torch.allclose(full["train_x"][:, 0], raw / 255 * 2 - 1)
    # area averaging: a flat image stays flat, every pixel stays in [-1, 1]
    assert torch.equal(small["train_x"][0], torch.full((1, 16, 16), 1.0))
    assert small["train_x"].abs().max() <= 1.0
    assert full["train_y"].dtype == torch.long and len(full["test_y"]) == 4


def test_missing_or_broken_files_say_how_to_install(root, tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_data(tmp_path / "nowhere")
    (root / FILES["test_y"]).write_bytes(gzip.compress(b"\x00\x01\x02\x03"))
    with pytest.raises(UsageError, match="not an IDX file"):
        load_data(root)
    write_idx(root / FILES["test_y"], np.zeros(3))                     # 4 images, 3 labels
    with pytest.raises(UsageError, match="do not pair up"):
        load_data(root)
    with pytest.raises(UsageError, match="size 20"):
        load_data(root, 20)


# ---------------------------------------------------------------------------- the recipes, tiny


def tiny(root):
    """The fashion spec reading the synthetic files, its classifiers trained for one epoch."""
    from dataclasses import replace

    from diffusion_blend.domains import fashion

    return replace(fashion.spec(root), classifier_config={"epochs": 1, "batch_size": 4})


def test_base_recipe_stopped_and_resumed_gives_the_same_weights(root, tmp_path):
    from diffusion_blend.domains.images import BaseConfig
    from diffusion_blend.evaluation.images import run_train_base

    spec, cfg = tiny(root), BaseConfig(iterations=3, batch_size=4, checkpoint_every=1)
    whole = run_train_base(spec, tmp_path / "a", cfg, progress=False, quality_per_class=1)
    part = run_train_base(spec, tmp_path / "b", cfg, progress=False, stop_after=2)
    assert part["stopped_at"] == 2 and not (tmp_path / "b" / "base.safetensors").exists()
    from safetensors.torch import load_file

    earlier = float(load_file(tmp_path / "b" / "checkpoints" / "step-000002" /
                              "extra.safetensors")["seconds"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "b").iterdir())
    with pytest.raises(UsageError, match=r"config differs in \['lr'\]"):
        run_train_base(spec, tmp_path / "b", BaseConfig(iterations=3, batch_size=4,
                                                        checkpoint_every=1, lr=1e-3),
                       resume=True, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "b").iterdir()) == before
    again = run_train_base(spec, tmp_path / "b", cfg, resume=True, progress=False,
                           quality_per_class=1)
    assert again["base"]["resumed_at"] == 2
    assert again["base"]["train_seconds"] >= earlier > 0     # the stopped part counts too
    for name in ("base", "classifier", "judge"):
        assert whole[name]["sha256"] == again[name]["sha256"], name   # bit for bit
    q = whole["base"]["quality"]
    assert len(q["accuracy_per_class"]) == 10 and q["frechet_train_vs_test"] >= 0


def test_train_base_fashion_command_refuses_missing_data_before_writing(capsys, tmp_path):
    from diffusion_blend.cli import main

    out = tmp_path / "out"
    rc = main(["train-base", "fashion", "--data", str(tmp_path / "none"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "apt-get install" in err and not out.exists()
    rc = main(["train-base", "fashion", "--resume", "--out", str(tmp_path)])
    assert rc == 2 and "not a fashion-base directory" in capsys.readouterr().err


@pytest.mark.slow
def test_experts_on_a_tiny_fashion_base_blend_with_exact_endpoints(root, tmp_path, monkeypatch):
    from dataclasses import replace

    from diffusion_blend.blend import Preference
    from diffusion_blend.domains.fashion import FashionDomain
    from diffusion_blend.domains.images import BaseConfig
    from diffusion_blend.evaluation.images import run_train_base
    from diffusion_blend.evaluation.methods import run_method
    from diffusion_blend.finetune.config import PRESETS
    from diffusion_blend.finetune.images import expert_specs, run_train_experts

    tiny_run = {"iterations": 1, "stop": "budget", "batch_size": 2, "eval_trajectories": 2}
    monkeypatch.setitem(PRESETS, "images-pathwise", PRESETS["images-pathwise"] | tiny_run)
    spec, w = replace(tiny(root), steps=4), tmp_path / "w"
    run_train_base(spec, w, BaseConfig(iterations=2, batch_size=4), progress=False,
                   quality_per_class=1)
    done = run_train_experts(spec, w, w / "experts", iterations=1, progress=False,
                             only=["ink", "smooth"], stop="budget")
    assert set(done) == {"ink", "smooth"} and done["ink"]["domain"] == "fashion"
    assert done["ink"]["config"]["sample_steps"] == 4   # trained on the chain it samples
    # a reward the domain reports but does not fine-tune by default gets an expert by name
    extra = run_train_experts(spec, w, tmp_path / "extra", iterations=1, progress=False,
                              only=["class-logprob"], stop="budget")
    assert set(extra) == {"class-logprob"}
    assert extra["class-logprob"]["rewards"] == ["class-logprob"]
    assert "class-logprob" not in [e.name for e, _, _ in expert_specs(spec, spec.alpha)]
    dom = FashionDomain(weights_dir=w)
    assert dom.names == ["ink", "smooth"] and dom.shape == (1, 16, 16)
    seeds = [0, 1, 2]
    base = run_method("pretrained", dom, Preference((1.0, 0.0)), seeds).x0
    ink = run_method("db-mpa", dom, Preference((1.0, 0.0)), seeds).x0
    assert torch.equal(run_method("db-mpa", dom, Preference((0.3, 0.7), 0.0), seeds).x0, base)
    assert torch.equal(run_method("morl", dom, Preference((1.0, 0.0)), seeds).x0, ink)
    assert dom.rewards(ink, **dom.cond(seeds)).shape == (3, 2)
    assert dom.cond([13])["y"].tolist() == [3] and dom.cond([0], "Dress")["y"].tolist() == [3]
    _missing_morl_adapters_are_trained_on_demand(w, tmp_path / "morl", seeds)


def _missing_morl_adapters_are_trained_on_demand(w, morl, seeds):
    """``sweep --train-morl``: a MORL adapter not shipped is fine-tuned by the experts' recipe on
    the chain being swept, saved in the MORL folder, and found there the next time (the
    caller has shrunk the recipe's preset)."""
    import json

    from diffusion_blend.blend import Preference
    from diffusion_blend.domains.fashion import FashionDomain
    from diffusion_blend.evaluation.methods import run_method
    from diffusion_blend.evaluation.sweep import morl_trainer

    dom = FashionDomain(steps=3, weights_dir=w, morl_dir=morl, morl_trainer=morl_trainer(morl))
    half, adapter = Preference((0.5, 0.5)), morl / "morl_ink_smooth_w050.safetensors"
    assert dom.morl(Preference((0.5, 0.5), 0.5)) is None and not morl.exists()   # lambda 1 only
    x0 = run_method("morl", dom, half, seeds).x0
    meta = json.loads(adapter.with_suffix(".json").read_text())
    assert meta["w"] == [0.5, 0.5] and meta["rewards"] == ["ink", "smooth"]
    assert meta["config"]["sample_steps"] == 3 and meta["alpha"] == dom.alpha
    stamp = adapter.stat().st_mtime_ns
    assert torch.equal(run_method("morl", dom, half, seeds).x0, x0)   # found, not retrained
    assert adapter.stat().st_mtime_ns == stamp


def test_guidance_folded_into_the_base_resumes_and_changes_the_network(root, tmp_path):
    from diffusion_blend.domains.images import BaseConfig
    from diffusion_blend.evaluation.images import run_train_base

    spec = tiny(root)
    plain = BaseConfig(iterations=2, batch_size=4, checkpoint_every=1)
    folded = BaseConfig(iterations=2, batch_size=4, checkpoint_every=1, guidance=3.0,
                        guidance_iterations=2, guidance_lr=1e-2)
    a = run_train_base(spec, tmp_path / "a", plain, progress=False, quality_per_class=1)
    b = run_train_base(spec, tmp_path / "b", folded, progress=False, quality_per_class=1)
    assert a["base"]["sha256"] != b["base"]["sha256"] and "guidance_final_loss" in b["base"]
    (tmp_path / "b" / "base.safetensors").unlink()       # as if stopped before the end
    c = run_train_base(spec, tmp_path / "b", folded, resume=True, progress=False,
                       quality_per_class=1)
    assert c["base"]["sha256"] == b["base"]["sha256"]
    with pytest.raises(UsageError, match="guidance"):
        BaseConfig(guidance=0.5)
