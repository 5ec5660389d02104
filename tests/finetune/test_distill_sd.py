"""``dblend distill sd`` on tiny offline pipelines (SD eps, SD v, SD3 flow): the distilled
adapter approaches the blend on held-out preferences, runs at one network evaluation per step,
refuses preferences outside its training range unless allowed, and resumes to the same
weights."""

import pytest
import torch
from safetensors.torch import load_file

from diffusion_blend.adapters import use_adapter
from diffusion_blend.amortised import AMORTISED_FILE, time_embedding_of
from diffusion_blend.blend import Preference
from diffusion_blend.errors import UsageError
from diffusion_blend.finetune.distill_sd import SdDistillConfig, distill, teacher_calls
from diffusion_blend.pipelines import (
    amortise_pipeline,
    blend_pipeline,
    denoiser_attr,
    prediction_of,
    unblend_pipeline,
)
from tests.test_pipelines import UNET_TARGETS, add_experts
from tests.tiny_sd import tiny_sd3_pipeline_with_encoders, tiny_sd_pipeline

pytestmark = pytest.mark.slow
PROMPTS = ["a red apple", "a blue pear", "a green fig"]
HELD_OUT = [Preference((0.3, 0.7), 0.8), Preference((0.9, 0.1), 1.6, True)]
TARGETS = {"sd": UNET_TARGETS, "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj",
                                       "add_v_proj", "ff.net.2", "norm1.linear"]}


def make_pipe(kind, tmp):
    """A tiny pipeline with two random LoRA experts ``a`` and ``b``."""
    pipe = (tiny_sd3_pipeline_with_encoders(tmp) if kind == "sd3-flow" else
            tiny_sd_pipeline(tmp, "v_prediction" if kind == "sd-v" else "epsilon"))
    add_experts(getattr(pipe, denoiser_attr(pipe)), ["a", "b"],
                TARGETS["sd3" if kind == "sd3-flow" else "sd"], seed=5)
    return pipe


def cfg(**kw):
    return SdDistillConfig(**({"iterations": 30, "batch_size": 2, "steps": 3, "guidance": 3.0,
                               "lr": 1e-2, "lam_max": 2.0, "checkpoint_every": 10,
                               "height": 16, "width": 16} | kw))


def held_out_errors(pipe, out, c) -> tuple[float, float]:
    """Mean squared error against the blend, at the states of blended trajectories on held-out
    preferences, prompts and seeds, of the base (the untrained student: its LoRA's B and its
    embedding's last layer start at zero) and of the distilled adapter."""
    model = getattr(pipe, denoiser_attr(pipe))
    base, ours = 0.0, 0.0
    for pref in HELD_OUT:
        calls = teacher_calls(pipe, blend_pipeline(pipe, ["a", "b"], pref), ["a yellow lemon"],
                              [10_000], c)
        amortise_pipeline(pipe, out, pref, allow_extrapolation=True)
        with torch.no_grad():
            for args, kwargs, target in calls:
                with use_adapter(model, None):
                    b = prediction_of(type(model).forward(model, *args, **kwargs))
                base += float((b - target).pow(2).mean())
                ours += float((prediction_of(model(*args, **kwargs)) - target).pow(2).mean())
        unblend_pipeline(pipe)
    return base, ours


@pytest.mark.parametrize("kind", ["sd-eps", "sd-v", "sd3-flow"])
def test_the_distilled_adapter_approaches_the_blend_at_one_nfe_per_step(kind, tmp_path):
    c, out = cfg(), tmp_path / "out"
    meta = distill(make_pipe(kind, tmp_path / "t1"), ["a", "b"], PROMPTS, out, c,
                   progress=False)
    assert meta["lora"]["targets"] == sorted(TARGETS["sd3" if kind == "sd3-flow" else "sd"])
    fresh = make_pipe(kind, tmp_path / "t2")           # the same base, loaded anew
    before, after = held_out_errors(fresh, out, c)
    assert after < 0.9 * before, (before, after)      # deterministic: fixed seeds and prompts

    model = getattr(fresh, denoiser_attr(fresh))
    amortised = amortise_pipeline(fresh, out, Preference((0.3, 0.7), 0.8))
    calls = []
    time_embedding_of(model)[0].register_forward_hook(lambda *a: calls.append(1))
    fresh(prompt=["a red apple"], num_inference_steps=3, guidance_scale=3.0, height=16,
          width=16, output_type="latent", generator=[torch.Generator().manual_seed(0)])
    assert len(calls) == 3 and amortised.nfe == 1.0   # one (guidance-batched) call per step
    with pytest.raises(UsageError, match="0 <= lam <= 2"):
        amortised.preference = Preference((0.5, 0.5), 2.5, True)
    amortise_pipeline(fresh, out, Preference((0.5, 0.5), 2.5, True), allow_extrapolation=True)
    unblend_pipeline(fresh)


def test_a_resumed_distillation_ends_on_the_same_weights(tmp_path):
    c = cfg(iterations=4, checkpoint_every=2)     # killed after 3: resumes from 2
    whole = distill(make_pipe("sd-eps", tmp_path / "t1"), ["a", "b"], PROMPTS, tmp_path / "w",
                    c, progress=False)
    stopped = distill(make_pipe("sd-eps", tmp_path / "t2"), ["a", "b"], PROMPTS,
                      tmp_path / "r", c, progress=False, stop_after=3)
    assert stopped == {"stopped_at": 3}
    with pytest.raises(UsageError, match=r"config differs in \['guidance'\]"):
        distill(make_pipe("sd-eps", tmp_path / "t4"), ["a", "b"], PROMPTS, tmp_path / "r",
                cfg(iterations=4, checkpoint_every=2, guidance=5.0), resume=True, progress=False)
    resumed = distill(make_pipe("sd-eps", tmp_path / "t3"), ["a", "b"], PROMPTS, tmp_path / "r",
                      c, resume=True, progress=False)
    assert resumed["sha256"] == whole["sha256"]
    state = load_file(tmp_path / "w" / AMORTISED_FILE)
    assert any(k.startswith("pref.") for k in state) and any("lora_B" in k for k in state)


def test_another_base_is_refused(tmp_path):
    out = tmp_path / "o"
    distill(make_pipe("sd-eps", tmp_path / "t1"), ["a", "b"], PROMPTS, out,
            cfg(iterations=1), progress=False)
    other = make_pipe("sd-v", tmp_path / "t2")
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(UsageError, match="another base"):
        amortise_pipeline(other, out, Preference((0.5, 0.5)))
