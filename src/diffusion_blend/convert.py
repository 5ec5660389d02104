"""``dblend convert-lora OLD_DIR NEW_DIR``: LoRA weights saved by the original Diffusion Blend
code (DPOK-style ``unet.save_attn_procs``: diffusers 0.14 attention-processor layout in
``pytorch_lora_weights.bin``) to the PEFT layout that current diffusers loads with
``pipe.load_lora_weights(NEW_DIR, adapter_name=...)``.

Old key: ``<block>.attn1.processor.to_q_lora.down.weight`` (``up`` for the other factor);
new key: ``unet.<block>.attn1.to_q.lora_A.weight`` (``lora_B``); ``to_out_lora`` becomes
``to_out.0``. The old processors had no alpha (scale 1), i.e. ``lora_alpha = rank``, which is
diffusers' default when no alphas are stored. The old file is read pickle-safely
(``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from diffusion_blend.errors import UsageError
from diffusion_blend.io import (
    atomic_write,
    prepare_out_dir,
    read_state_dict,
    sha256_file,
    write_json,
)

OLD_FILES = ("pytorch_lora_weights.bin", "pytorch_lora_weights.safetensors")
NEW_FILE = "pytorch_lora_weights.safetensors"
_OLD_KEY = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                      r"(?P<factor>down|up)\.weight$")


def read_old(old_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The old state dict (pickle-safe) and the file it came from."""
    old_dir = Path(old_dir)
    path = next((old_dir / f for f in OLD_FILES if (old_dir / f).exists()), None)
    if path is None:
        raise UsageError(f"{old_dir} has no {' or '.join(OLD_FILES)} to convert")
    return read_state_dict(path, "legacy LoRA"), path


def convert_keys(state: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Rename every old attention-processor LoRA key; any other key is an error."""
    out = {}
    for key, value in state.items():
        m = _OLD_KEY.match(key)
        if m is None:
            raise UsageError(f"key {key!r} is not in the diffusers 0.14 attention-processor "
                             "LoRA layout (<block>.processor.to_[q|k|v|out]_lora.[down|up]"
                             ".weight)")
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        factor = "lora_A" if m["factor"] == "down" else "lora_B"
        out[f"{prefix}.{m['block']}.{proj}.{factor}.weight"] = value.contiguous()
    return out


def convert_lora(old_dir: str | Path, new_dir: str | Path, overwrite: bool = False) -> dict:
    """Convert ``old_dir`` into ``new_dir/pytorch_lora_weights.safetensors`` (+ JSON note)."""
    from safetensors.torch import save_file

    if Path(old_dir).resolve() == Path(new_dir).resolve():
        raise UsageError(f"convert-lora {old_dir} {new_dir}: the output would replace its own "
                         "source; give another NEW_DIR")
    state, src = read_old(old_dir)
    source_sha = sha256_file(src)
    new = convert_keys(state)
    ranks = sorted({v.shape[0] for k, v in new.items() if k.endswith("lora_A.weight")})
    out = prepare_out_dir(new_dir, overwrite, "lora")
    atomic_write(out / NEW_FILE, lambda p: save_file(new, str(p), metadata={"format": "pt"}))
    meta = {"converted_from": str(src), "source_sha256": source_sha, "tensors": len(new),
            "ranks": ranks, "lora_alpha": "rank (scale 1, as the old processors)"}
    write_json(out / "conversion.json", meta)
    return meta | {"out": str(out / NEW_FILE)}
