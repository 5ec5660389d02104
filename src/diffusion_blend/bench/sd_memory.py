"""``dblend bench sd-memory``: K LoRA experts at the memory of one model.

One blended denoiser step (K experts plus the base, i.e. K + 1 terms) five ways,
each in a fresh process so its peak memory is its own:

- ``single``: one UNet, one forward of B rows (the pretrained model's cost);
- ``lora``: one UNet with K LoRA adapters, one routed forward of (K + 1) B rows
  (``pipelines.BlendedModel``, ``mode="batched"``);
- ``sequential``: the same UNet and adapters, the K + 1 terms one after another, accumulated
  in place (``mode="sequential"``: one model's activations);
- ``merged``: each term's adapter merged into its own copy of the UNet, the terms one after
  another (``mode="merged"``: K + 1 weight sets, no LoRA overhead);
- ``full``: K + 1 separate UNets (the paper's setting), K + 1 forwards.

UNets are built from a config with random weights (nothing is downloaded): ``sd15`` is Stable
Diffusion 1.5's UNet (860M parameters, 64x64 latents); ``small`` is a scaled-down one for CPUs.
Memory is the peak above what the process held before building the models: the CUDA
allocator's on a GPU, else the resident set size's (the torch runtime itself is left out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

CONFIGS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=768, attention_head_dim=8, layers_per_block=2),
    "small": dict(sample_size=32, block_out_channels=(64, 128, 256, 256),
                  cross_attention_dim=256, attention_head_dim=8, layers_per_block=1),
    "tiny": dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                 cross_attention_dim=16, attention_head_dim=4, layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
MODES = ("single", "lora", "sequential", "merged", "full")
VARIANTS = MODES[1:]


def build_unet(config: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**CONFIGS[config]).eval().requires_grad_(False)


def _experts_lora(unet, k: int, rank: int):
    from diffusion_blend.adapters import add_lora

    for i in range(k):
        add_lora(unet, f"e{i}", rank, ("to_q", "to_k", "to_v", "to_out.0"))
    unet.requires_grad_(False)
    return [f"e{i}" for i in range(k)]


def run_mode(mode: str, config: str, k: int, batch: int, rank: int, repeats: int) -> dict:
    """Build the models of ``mode``, time ``repeats`` blended steps, report peak memory."""
    from diffusion_blend.blend import Preference
    from diffusion_blend.evaluation.methods import measure_cost, memory_mb
    from diffusion_blend.pipelines import BlendedModel

    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    before = memory_mb("now") or 0.0    # the runtime itself (CPU RSS), not the models
    base = build_unet(config).to(device)
    if mode == "single":
        model = base
    else:
        experts = ([build_unet(config, seed=i + 1).to(device) for i in range(k)]
                   if mode == "full" else _experts_lora(base, k, rank))
        model = BlendedModel(base, experts, Preference((1.0 / k,) * k, 0.5),
                             mode=mode if mode in ("sequential", "merged") else "batched")
    size = CONFIGS[config]["sample_size"]
    x = torch.randn(batch, 4, size, size, device=device)
    ehs = torch.randn(batch, 77, CONFIGS[config]["cross_attention_dim"], device=device)
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        model(x, t, encoder_hidden_states=ehs)   # warm-up (merged: makes the copies)
        _sync(device)
    _, seconds, peak, _ = measure_cost(lambda: _steps(model, x, t, ehs, repeats, device))
    params = sum(p.numel() for p in model.parameters())
    if mode == "merged":
        params = sum(p.numel() for term in model._copies.values()
                     for p in term.network.parameters())
    return {"mode": mode, "params": params, "peak_memory_mb": peak,
            "memory_above_runtime_mb": peak - before,
            "seconds_per_step": seconds / repeats, "device": str(device)}


def _steps(model, x, t, ehs, repeats: int, device) -> None:
    with torch.no_grad():
        for _ in range(repeats):
            model(x, t, encoder_hidden_states=ehs)
        _sync(device)


def _sync(device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def bench_sd_memory(config: str = "small", k: int = 3, batch: int = 2, rank: int = 4,
                    repeats: int = 3) -> dict:
    """Run every mode in a fresh process; memory and time ratios against ``single``."""
    rows = {}
    for mode in MODES:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "diffusion_blend.bench.sd_memory", mode,
                              config, str(k), str(batch), str(rank), str(repeats)],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[mode]["process_seconds"] = time.perf_counter() - start
    single = rows["single"]
    key = "memory_above_runtime_mb"
    ratios = {f"{m}_memory_vs_single": rows[m][key] / single[key] for m in VARIANTS}
    ratios |= {f"{m}_time_vs_single": rows[m]["seconds_per_step"] / single["seconds_per_step"]
               for m in VARIANTS}
    return {"config": config, "experts": k, "batch": batch, "lora_rank": rank,
            "terms": k + 1, "rows": rows, **ratios}


if __name__ == "__main__":
    mode, config, k, batch, rank, repeats = sys.argv[1:7]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(run_mode(mode, config, int(k), int(batch), int(rank), int(repeats))))
