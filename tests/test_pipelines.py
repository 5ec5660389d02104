"""The blend as a drop-in denoiser for tiny offline diffusers pipelines (SD and flow-matching)."""

import pytest
import torch
from peft import LoraConfig

from diffusion_blend.adapters import add_lora, use_adapter
from diffusion_blend.blend import Preference
from diffusion_blend.errors import UsageError
from diffusion_blend.pipelines import BlendedModel, blend_pipeline, unblend_pipeline
from tests.tiny_sd import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


def add_experts(model, names, targets, seed=0):
    """LoRA adapters with random (non-zero) B, so each expert differs from the base."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets), adapter_name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("tok"))
    add_experts(pipe.unet, ["a", "b"], UNET_TARGETS)
    return pipe


def run(pipe, seed=0, guidance=7.5, prompt=("a red apple", "a blue pear")):
    g = [torch.Generator().manual_seed(seed + i) for i in range(len(prompt))]
    return pipe(list(prompt), num_inference_steps=3, guidance_scale=guidance, generator=g,
                output_type="pt", height=16, width=16).images


def _single(unet, name):
    """The pipeline output with only adapter ``name`` (None: the base) active."""
    return lambda pipe: _with(unet, name, lambda: run(pipe))


def _with(unet, name, fn):
    with use_adapter(unet, name):
        return fn()


def test_lam_zero_is_the_base_and_unit_w_is_the_expert_exactly(sd):
    base_img = _with(sd.unet, None, lambda: run(sd))
    expert_b = _with(sd.unet, "b", lambda: run(sd))
    model = blend_pipeline(sd, ["a", "b"], Preference((0.3, 0.7), 0.0))
    try:
        assert torch.equal(run(sd), base_img)
        model.preference = Preference((0.0, 1.0))   # change without reloading anything
        assert torch.equal(run(sd), expert_b)
        model.preference = Preference((0.5, 0.5))
        mid = run(sd)
        assert not torch.equal(mid, expert_b) and not torch.equal(mid, base_img)
    finally:
        unblend_pipeline(sd)
    assert sd.unet is model.base


def test_batched_multi_adapter_forward_equals_separate_forwards(sd):
    unet = sd.unet
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(500)
    ehs = torch.randn(3, 5, 32)
    pref = Preference((0.25, 0.75), 1.6, allow_extrapolation=True)
    c_pre, c = pref.coefficients()
    preds = {n: _with(unet, n, lambda: unet(x, t, encoder_hidden_states=ehs).sample)
             for n in (None, "a", "b")}
    expected = c_pre * preds[None] + c[0] * preds["a"] + c[1] * preds["b"]
    blended = BlendedModel(unet, ["a", "b"], pref)(x, t, encoder_hidden_states=ehs)
    assert torch.allclose(blended.sample, expected, atol=1e-5)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    assert isinstance(blended, UNet2DConditionOutput)   # the pipeline's own output type
    as_tuple = BlendedModel(unet, ["a", "b"], pref)(x, t, encoder_hidden_states=ehs,
                                                     return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], expected, atol=1e-5)


def test_blending_commutes_with_classifier_free_guidance(sd):
    unet, s = sd.unet, 7.5
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(300)
    cond, uncond = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    pref = Preference((0.4, 0.6), 1.3, allow_extrapolation=True)
    model = BlendedModel(unet, ["a", "b"], pref)
    both = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    guided_blend = both[:2] + s * (both[2:] - both[:2])
    c_pre, c = pref.coefficients()
    blend_guided = 0
    for coef, name in ((c_pre, None), (c[0], "a"), (c[1], "b")):
        u = _with(unet, name, lambda: unet(x, t, encoder_hidden_states=uncond).sample)
        v = _with(unet, name, lambda: unet(x, t, encoder_hidden_states=cond).sample)
        blend_guided = blend_guided + coef * (u + s * (v - u))
    assert torch.allclose(guided_blend, blend_guided, atol=1e-4)


def test_full_fine_tuned_modules_as_experts(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path, prediction_type="v_prediction")
    experts = [tiny_unet(seed=1), tiny_unet(seed=2)]
    base = pipe.unet
    pipe.unet = experts[1]
    expert_img = run(pipe, guidance=3.0)
    pipe.unet = base
    base_img = run(pipe, guidance=3.0)
    model = blend_pipeline(pipe, experts, Preference((0.0, 1.0)))
    assert torch.equal(run(pipe, guidance=3.0), expert_img)
    model.preference = Preference((0.5, 0.5), 0.0)
    assert torch.equal(run(pipe, guidance=3.0), base_img)
    with pytest.raises(UsageError, match="2 experts"):
        model.preference = Preference((0.2, 0.3, 0.5))


def test_flow_matching_transformer_blend():
    pipe = tiny_sd3_pipeline()
    add_experts(pipe.transformer, ["a", "b"], ["to_q", "to_k", "to_v", "add_q_proj"], seed=3)
    pe, pp = torch.randn(1, 5, 32), torch.randn(1, 16)

    def go():
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=pe * 0,
                    negative_pooled_prompt_embeds=pp * 0, num_inference_steps=3,
                    guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt", height=16, width=16).images

    base_img = _with(pipe.transformer, None, go)
    expert_a = _with(pipe.transformer, "a", go)
    x = torch.randn(2, 4, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16),
              timestep=torch.tensor([500.0, 500.0]))
    tr = pipe.transformer
    sep = [_with(tr, n, lambda: tr(x, **kw).sample) for n in ("a", "b")]
    model = blend_pipeline(pipe, ["a", "b"], Preference((1.0, 0.0)))
    assert torch.equal(go(), expert_a)
    model.preference = Preference((0.5, 0.5), 0.0)
    assert torch.equal(go(), base_img)
    model.preference = Preference((0.3, 0.7))
    assert torch.allclose(tr(x, **kw).sample, 0.3 * sep[0] + 0.7 * sep[1], atol=1e-5)
    unblend_pipeline(pipe)


def test_guidance_distilled_flux_blend():
    """Flux: flow matching, guidance distilled (no CFG batch; the scale is an input)."""
    from tests.tiny_sd import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    add_experts(pipe.transformer, ["a", "b"], ["to_q", "to_k", "to_v", "add_q_proj"], seed=9)
    pe, pp = torch.randn(1, 5, 32), torch.randn(1, 16)

    def go():
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=3,
                    guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                    output_type="pt", height=16, width=16).images

    want = {n: _with(pipe.transformer, n, go) for n in (None, "a", "b")}
    model = blend_pipeline(pipe, ["a", "b"], Preference((0.0, 1.0)))
    try:
        assert torch.equal(go(), want["b"])
        model.preference = Preference((0.5, 0.5), 0.0)
        assert torch.equal(go(), want[None])
        model.preference = Preference((0.5, 0.5))
        mid = go()
        model.mode = "sequential"
        assert torch.allclose(go(), mid, atol=1e-5)
    finally:
        unblend_pipeline(pipe)
    assert not torch.equal(mid, want["a"]) and not torch.equal(want["a"], want[None])


def test_unknown_adapter_is_refused(sd):
    with pytest.raises(UsageError, match="not loaded"):
        BlendedModel(sd.unet, ["a", "nope"], Preference((0.5, 0.5)))


def test_sdxl_style_unet_with_added_conditioning():
    """SDXL's UNet takes ``added_cond_kwargs`` (pooled text embeddings, time ids): the routed
    forward repeats them with the batch, and equals the separate forwards."""
    from tests.tiny_sd import tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    add_experts(unet, ["a", "b"], UNET_TARGETS, seed=5)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(300), torch.randn(2, 5, 32)
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    kw = dict(encoder_hidden_states=ehs, added_cond_kwargs=added)
    sep = {n: _with(unet, n, lambda: unet(x, t, **kw).sample) for n in (None, "a", "b")}
    pref = Preference((0.6, 0.4), 0.5)
    c_pre, c = pref.coefficients()
    want = c_pre * sep[None] + c[0] * sep["a"] + c[1] * sep["b"]
    assert torch.allclose(BlendedModel(unet, ["a", "b"], pref)(x, t, **kw).sample, want,
                          atol=1e-5)


def test_while_blended_the_pipeline_keeps_its_real_model_and_lora_api(sd, tmp_path):
    """``pipe.unet`` stays the diffusers model: the LoRA API reads it; the calls that would
    change which adapters run, and ``save_pretrained``, are refused with the fix."""
    from diffusers import UNet2DConditionModel

    before = sd.get_list_adapters()
    blend_pipeline(sd, ["a", "b"], Preference((0.5, 0.5)))
    try:
        assert isinstance(sd.unet, UNet2DConditionModel)
        assert sd.get_list_adapters() == before == {"unet": ["a", "b"]}
        for call in (lambda: sd.set_adapters("a"), sd.disable_lora, sd.enable_lora,
                     sd.fuse_lora, lambda: sd.delete_adapters("a"), sd.unload_lora_weights):
            with pytest.raises(UsageError, match="unblend_pipeline"):
                call()
        with pytest.raises(UsageError, match="save_pretrained.*unload_lora_weights"):
            sd.save_pretrained(tmp_path / "never-written")
        assert not (tmp_path / "never-written").exists()
        assert list(sd.config["unet"]) == ["diffusers", "UNet2DConditionModel"]   # live config
    finally:
        unblend_pipeline(sd)
    assert "forward" not in sd.unet.__dict__ and "set_adapters" not in sd.__dict__
    sd.set_adapters(["a", "b"])   # the pipeline's own API is back


def test_adapter_weights_set_before_blending_do_not_leak_into_the_terms(sd):
    """``set_adapters(..., adapter_weights)`` scales the LoRAs outside the blend only: each
    term is its expert at the trained scale (``cross_attention_kwargs["scale"]`` scales all)."""
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(400), torch.randn(2, 5, 32)
    unet = sd.unet
    full_a = _with(unet, "a", lambda: unet(x, t, encoder_hidden_states=ehs).sample)
    half = _with(unet, "a", lambda: unet(x, t, encoder_hidden_states=ehs,
                                         cross_attention_kwargs={"scale": 0.5}).sample)
    sd.set_adapters(["a", "b"], adapter_weights=[0.5, 0.25])
    try:
        for pref in (Preference((1.0, 0.0)), Preference((0.6, 0.4), 0.5)):
            model = BlendedModel(unet, ["a", "b"], pref)
            got = model(x, t, encoder_hidden_states=ehs).sample
            if pref.w == (1.0, 0.0):
                assert torch.equal(got, full_a)
        scaled = BlendedModel(unet, ["a", "b"], Preference((1.0, 0.0)))(
            x, t, encoder_hidden_states=ehs, cross_attention_kwargs={"scale": 0.5}).sample
        assert torch.allclose(scaled, half, atol=1e-6)
    finally:
        sd.set_adapters(["a", "b"])
    assert not torch.equal(full_a, half)


def test_dora_experts_are_blended_one_after_another_and_fused_adapters_refused(tmp_path):
    unet = tiny_unet(seed=4)
    for name in ("d1", "d2"):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                    use_dora=True, init_lora_weights=False), adapter_name=name)
    unet.requires_grad_(False)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(300), torch.randn(2, 5, 32)
    sep = {n: _with(unet, n, lambda: unet(x, t, encoder_hidden_states=ehs).sample)
           for n in (None, "d1", "d2")}
    pref = Preference((0.3, 0.5))
    c_pre, c = pref.coefficients()
    want = c_pre * sep[None] + c[0] * sep["d1"] + c[1] * sep["d2"]
    got = BlendedModel(unet, ["d1", "d2"], pref)(x, t, encoder_hidden_states=ehs).sample
    assert torch.allclose(got, want, atol=1e-5)
    pipe = tiny_sd_pipeline(tmp_path)
    add_experts(pipe.unet, ["a", "b"], UNET_TARGETS)
    pipe.fuse_lora(adapter_names=["a"])
    with pytest.raises(UsageError, match="unfuse_lora"):
        blend_pipeline(pipe, ["a", "b"], Preference((0.5, 0.5)))


@pytest.mark.parametrize("mode", ["sequential", "merged", "auto"])
def test_sequential_merged_and_auto_modes_equal_the_batched_blend(sd, mode):
    unet = sd.unet
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(200), torch.randn(2, 5, 32)
    pref = Preference((0.2, 0.5), 1.4, allow_extrapolation=True)
    rows = []
    hook = unet.conv_in.register_forward_pre_hook(
        lambda m, a: rows.append((m is unet.conv_in, a[0].shape[0])))
    try:
        batched = BlendedModel(unet, ["a", "b"], pref)(x, t, encoder_hidden_states=ehs).sample
        other = BlendedModel(unet, ["a", "b"], pref, mode=mode)(x, t, encoder_hidden_states=ehs)
    finally:
        hook.remove()
    assert torch.allclose(other.sample, batched, atol=1e-5)
    # batched: one forward of 3 x 2 rows; sequential: 3 forwards of 2 on the base network;
    # merged (and auto, with this machine's memory): 3 forwards of 2 on the merged copies
    assert rows == [(True, 6)] + [(mode == "sequential", 2)] * 3
    with pytest.raises(UsageError, match="mode 'fast'"):
        BlendedModel(unet, ["a", "b"], pref, mode="fast")


def test_float64_models_are_blended_in_float64():
    unet = add_experts(tiny_unet(seed=6).double(), ["a", "b"], ["to_q", "to_k", "to_v"], seed=2)
    unet.double()
    x, t, ehs = (torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor(100),
                 torch.randn(2, 5, 32, dtype=torch.float64))
    sep = {n: _with(unet, n, lambda: unet(x, t, encoder_hidden_states=ehs).sample)
           for n in (None, "a", "b")}
    pref = Preference((0.3, 0.4), 1.5, allow_extrapolation=True)
    c_pre, c = pref.coefficients()
    want = c_pre * sep[None] + c[0] * sep["a"] + c[1] * sep["b"]
    for mode in ("batched", "sequential"):
        got = BlendedModel(unet, ["a", "b"], pref, mode=mode)(x, t, encoder_hidden_states=ehs)
        assert got.sample.dtype == torch.float64
        assert torch.allclose(got.sample, want, rtol=0, atol=1e-12)


def _text_lora(encoder, names, seed):
    """The text-encoder half of each LoRA (what ``load_lora_weights`` adds), random B."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        add_lora(encoder, name, 2, ["q_proj", "k_proj", "v_proj", "out_proj"])
        with torch.no_grad():
            for n, p in encoder.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    encoder.requires_grad_(False)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_text_encoder_loras_are_blended_term_by_term(tmp_path, kind):
    """LoRAs with text-encoder layers (as community LoRAs have): each term encodes the prompt
    with its own text-encoder adapter (SDXL: both encoders, the pooled embedding too), so
    ``w = e_i`` is the pipeline with only adapter i on and ``lam = 0`` the pipeline with
    adapters disabled."""
    from tests.tiny_sd import tiny_sd3_pipeline_with_encoders, tiny_sdxl_pipeline

    make = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline,
            "sd3": tiny_sd3_pipeline_with_encoders}
    pipe = make[kind](tmp_path)
    if kind == "sd3":
        add_experts(pipe.transformer, ["a", "b"], ["to_q", "to_k", "to_v", "add_q_proj"], seed=7)
    else:
        add_experts(pipe.unet, ["a", "b"], UNET_TARGETS, seed=7)
    for i, enc in enumerate(e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                            if e is not None):
        _text_lora(enc, ["a", "b"], seed=8 + i)
    want = {}
    for name in ("a", "b"):
        pipe.set_adapters(name)
        want[name] = run(pipe, guidance=3.0)
    pipe.disable_lora()
    want[None] = run(pipe, guidance=3.0)
    pipe.enable_lora()
    pipe.set_adapters(["a", "b"])   # both on: what every term used to see
    model = blend_pipeline(pipe, ["a", "b"], Preference((1.0, 0.0)))
    try:
        assert torch.allclose(run(pipe, guidance=3.0), want["a"], atol=1e-6)
        model.preference = Preference((0.0, 1.0))
        assert torch.allclose(run(pipe, guidance=3.0), want["b"], atol=1e-6)
        model.preference = Preference((0.5, 0.5), 0.0)
        assert torch.allclose(run(pipe, guidance=3.0), want[None], atol=1e-6)
        mids = []
        for mode in ("batched", "sequential", "merged"):
            blend_pipeline(pipe, ["a", "b"], Preference((0.3, 0.4)), mode=mode)
            mids.append(run(pipe, guidance=3.0))
        assert all(torch.allclose(m, mids[0], atol=1e-5) for m in mids[1:])
    finally:
        unblend_pipeline(pipe)
    assert not torch.allclose(want["a"], want[None], atol=1e-3)   # the LoRAs do something
