"""The sd domain end to end on a tiny offline pipeline: fine-tune (DPOK and pathwise, resumable,
bf16 + accumulation), save a diffusers LoRA, sample the blend from the command line."""

import json

import pytest
import torch

from diffusion_blend.blend import Preference
from diffusion_blend.cli import main
from diffusion_blend.domains.sd import SdDomain
from diffusion_blend.evaluation.methods import run_method
from diffusion_blend.finetune.config import preset
from diffusion_blend.finetune.sd import finetune_sd
from diffusion_blend.sampling import sample
from tests.tiny_sd import save_tiny_clip, tiny_sd_pipeline

TINY = dict(batch_size=4, sample_steps=3, checkpoint_every=1, eval_trajectories=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(d / "tok").save_pretrained(d / "pipe")
    (d / "prompts.txt").write_text("a red apple\n\na blue pear\n")
    return d


@pytest.fixture(scope="module")
def expert(model_dir):
    out = model_dir / "dpok"
    finetune_sd(model_dir / "pipe", model_dir / "prompts.txt", "jpeg-compressibility",
                preset("sd-dpok", iterations=2, **TINY), out, guidance=3.0, progress=False)
    return out


def test_dpok_run_saves_a_diffusers_lora_and_resumes(model_dir, expert):
    result = json.loads((expert / "result.json").read_text())
    assert result["prompts"] == ["a red apple", "a blue pear"]
    assert (expert / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    finetune_sd(model_dir / "pipe", model_dir / "prompts.txt", "jpeg-compressibility",
                preset("sd-dpok", iterations=3, **TINY), expert, guidance=3.0, resume=True,
                progress=False)
    rows = (expert / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3]


def test_pathwise_with_bf16_and_accumulation(model_dir):
    out = model_dir / "pw"
    cfg = preset("sd-pathwise", iterations=1, mixed_precision="bf16", grad_accumulation=2,
                 **(TINY | {"sample_steps": 2}))
    res = finetune_sd(model_dir / "pipe", model_dir / "prompts.txt", "aesthetic", cfg, out,
                      reward_kwargs={"model": _tiny_clip(model_dir), "head": _head(model_dir)},
                      guidance=3.0, progress=False)
    from safetensors.torch import load_file

    assert res["last_iteration"]["skipped_steps"] == 0   # bf16 gave finite gradients: a step
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(bool(v.abs().sum() > 0) for v in ups)   # B starts at zero: it moved


def _tiny_clip(d):
    return save_tiny_clip(d / "clip")


def _head(d):
    from diffusion_blend.rewards.images import AestheticHead

    torch.manual_seed(0)
    torch.save(AestheticHead(32).state_dict(), d / "head.pth")
    return d / "head.pth"


def test_sample_sd_cli_and_the_blends_endpoints_are_exact(model_dir, expert, capsys):
    lora = str(expert / "lora")
    out = model_dir / "img.png"
    rc = main(["sample", "sd", "--model", str(model_dir / "pipe"), "--experts", f"{lora},{lora}",
               "--w", "0.3,0.7", "--prompt", "a red apple", "--steps", "3", "--guidance", "3",
               "--n", "2", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    # two LoRA terms, no base term, in one routed forward; guided: 2 x 2 per step
    assert rc == 0 and out.stat().st_size > 0 and summary["nfe_per_sample"] == 3 * 4.0
    dom = SdDomain(model_dir / "pipe", [lora], ["a red apple"], steps=3, guidance=3.0)
    seeds = [5, 6]

    def x0(method, pref):
        return run_method(method, dom, pref, seeds).x0

    assert torch.equal(x0("db-mpa", Preference((1.0,), 0.0)), x0("pretrained", Preference((1.0,))))
    alone = sample(dom.experts[0], dom.schedule, seeds, dom.shape, 3, cond=dom.cond(seeds)).x0
    assert torch.equal(x0("db-mpa", Preference((1.0,))), alone)
    assert not torch.equal(alone, x0("pretrained", Preference((1.0,))))   # the expert moved
    assert main(["sample", "sd", "--model", str(model_dir / "pipe"), "--experts", lora,
                 "--w", "0.5,0.5", "--out", str(model_dir / "x.png")]) == 2


@pytest.mark.slow
def test_sd_sweep_with_lora_experts(model_dir, expert, tmp_path):
    from diffusion_blend.evaluation.report import write_report
    from diffusion_blend.evaluation.sweep import SweepConfig, run_sweep

    lora = str(expert / "lora")
    sd_cfg = {"model": str(model_dir / "pipe"), "experts": [lora, lora],
              "rewards": ["jpeg-compressibility", "jpeg-incompressibility"],
              "prompts": ["a red apple", "a blue pear"], "guidance": 3.0}
    cfg = SweepConfig(domain="sd", w_grid="0,1", seeds=2, steps=2, lam_grid=(2.0,),
                      methods=("pretrained", "db-mpa", "soup", "code", "rgg", "morl"), sd=sd_cfg)
    out = run_sweep(cfg, tmp_path / "sweep", progress=False)
    rows = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["main|rgg|w=1,0|lam=1"]["available"] is False   # JPEG has no gradient
    for w in ("1,0", "0,1"):
        same = [rows[f"main|{m}|w={w}|lam=1"]["rewards"] for m in ("db-mpa", "soup", "morl")]
        assert same[0] == same[1] == same[2]
    write_report(out)
    assert (out / "grids.png").exists() and (out / "report.md").exists()


def test_ui_session_on_an_sd_pipeline(model_dir, expert):
    from diffusion_blend.errors import UsageError
    from diffusion_blend.ui import SdSession

    lora = str(expert / "lora")
    session = SdSession(str(model_dir / "pipe"), [lora, lora], steps=2, guidance=3.0)
    a = session.render("db-mpa", [0.3, 0.7], 1.0, False, "a red apple", 4)
    b = session.render("db-mpa", [0.3, 0.7], 0.0, False, "a red apple", 4)   # no reload
    assert a.figure is None and a.image.size[0] > 0
    # lam = 0 runs the base alone; lam = 1 the two experts (guided: 2 x 2 per step)
    assert (b.summary["lam"], b.summary["nfe_per_sample"], a.summary["nfe_per_sample"]) == (
        0.0, 2 * 2.0, 2 * 4.0)
    same = session.render("db-mpa", [0.3, 0.7], 1.0, False, "a red apple", 4)
    other = session.render("db-mpa", [0.3, 0.7], 1.0, False, "a red apple", 5)
    assert same.image.tobytes() == a.image.tobytes() != other.image.tobytes()
    with pytest.raises(UsageError, match="extrapolat"):
        session.render("db-mpa", [0.3, 0.7], 1.5, False, "a red apple", 4)
    with pytest.raises(UsageError, match="prompt is empty"):
        session.render("db-mpa", [0.3, 0.7], 1.0, False, " ", 4)


def test_a_lora_of_the_wrong_shape_is_a_one_line_error(model_dir, expert, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(expert / "lora" / "pytorch_lora_weights.safetensors")
    (tmp_path / "bad").mkdir()
    save_file({k: torch.zeros(v.shape[0] + 3, *v.shape[1:]) for k, v in state.items()},
              tmp_path / "bad" / "pytorch_lora_weights.safetensors")
    rc = main(["sample", "sd", "--model", str(model_dir / "pipe"), "--experts",
               str(tmp_path / "bad"), "--steps", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "not a LoRA diffusers can load" in err[-1]
    assert not (tmp_path / "x.png").exists()


def test_distill_sd_then_sample_the_amortised_blend_from_the_command_line(model_dir, expert,
                                                                          capsys, tmp_path):
    lora, out = str(expert / "lora"), tmp_path / "amortised"
    common = ["--model", str(model_dir / "pipe"), "--steps", "2", "--guidance", "3"]
    assert main(["distill", "sd", *common, "--experts", f"{lora},{lora}", "--prompts",
                 str(model_dir / "prompts.txt"), "--out", str(out), "--iterations", "2",
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["experts"] == [lora, lora] and meta["prompts"] == ["a red apple", "a blue pear"]
    assert main(["sample", "sd", *common, "--amortised", str(out), "--w", "0.3,0.7",
                 "--out", str(tmp_path / "img.png"), "--json"]) == 0   # experts from its JSON
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "amortised" and summary["experts"] == [lora, lora]
    assert summary["nfe_per_sample"] == 2 * 2.0     # one guided network call per step
    assert (tmp_path / "img.png").stat().st_size > 0
    rc = main(["distill", "sd", *common, "--experts", f"{lora},{tmp_path / 'nope'}",
               "--prompts", str(model_dir / "prompts.txt"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "nope does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
