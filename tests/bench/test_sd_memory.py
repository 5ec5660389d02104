from diffusion_blend.bench.sd_memory import bench_sd_memory, run_mode


def test_lora_experts_hold_about_one_model_and_full_experts_k_plus_one():
    rows = {m: run_mode(m, "tiny", k=3, batch=2, rank=2, repeats=1)
            for m in ("single", "lora", "full")}
    single = rows["single"]["params"]
    assert rows["full"]["params"] == 4 * single
    assert single < rows["lora"]["params"] < 1.2 * single
    assert all(r["seconds_per_step"] > 0 for r in rows.values())


def test_the_benchmark_runs_each_mode_in_its_own_process():
    out = bench_sd_memory("tiny", k=2, batch=1, rank=2, repeats=1)
    assert set(out["rows"]) == {"single", "lora", "full"} and out["terms"] == 3
    assert out["full_memory_vs_single"] > 0 and out["lora_time_vs_single"] > 0
