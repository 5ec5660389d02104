from diffusion_blend.bench.sd_memory import MODES, run_mode


def test_lora_experts_hold_about_one_model_and_full_experts_k_plus_one():
    rows = {m: run_mode(m, "tiny", k=3, batch=2, rank=2, repeats=1) for m in MODES}
    single = rows["single"]["params"]
    assert rows["full"]["params"] == 4 * single
    assert single < rows["lora"]["params"] < 1.2 * single
    assert rows["sequential"]["params"] == rows["lora"]["params"]   # the same weights held
    assert rows["merged"]["params"] == rows["full"]["params"]       # K + 1 weight sets
