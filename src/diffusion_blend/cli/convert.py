"""``dblend convert-lora``: legacy attention-processor LoRA files to PEFT safetensors."""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_blend.cli.args import OVERWRITE, arg, command, emit


def cmd_convert(a: argparse.Namespace) -> None:
    from diffusion_blend.convert import convert_lora

    emit(convert_lora(a.old_dir, a.new_dir, a.overwrite), a.json)


def register(sub: Any) -> None:
    command(sub, "convert-lora", cmd_convert,
            "legacy Diffusion Blend / DPOK LoRA (diffusers 0.14) -> PEFT safetensors",
            arg("old_dir"), arg("new_dir"), OVERWRITE)
