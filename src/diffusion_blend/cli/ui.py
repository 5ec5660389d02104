"""``dblend ui``: live sliders for w and lambda on a local page."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffusion_blend.cli.args import EXTRAPOLATE, arg, command, port_int, positive_int, threads
from diffusion_blend.errors import UsageError


def cmd_ui(a: argparse.Namespace) -> None:
    from diffusion_blend.io import check_out_folder
    from diffusion_blend.ui import bind_server, run_ui

    threads(a.threads)
    experts = [e for e in (a.experts or "").split(",") if e] or None
    if a.sd_model and not experts:
        raise UsageError("--sd-model needs --experts (LoRA directories)")
    check_out_folder(a.out)
    httpd = bind_server(a.host, a.port)   # a port in use is an error before models load
    server = run_ui(experts, a.out, a.host, a.port, a.sd_model, a.allow_extrapolation, a.steps,
                    httpd=httpd)
    sys.stderr.write(f"dblend ui: serving {server.url} (Ctrl-C stops)\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def register(sub: Any) -> None:
    command(sub, "ui", cmd_ui, "live sliders for w and lambda (a local web page)",
            arg("--experts", default=None, help="digits expert names or sd LoRA dirs"),
            arg("--sd-model", default=None, help="a local diffusers pipeline instead of digits"),
            arg("--steps", type=positive_int, default=30, help="sd sampling steps"),
            arg("--host", default="127.0.0.1"), arg("--port", type=port_int, default=7860),
            arg("--out", default="dblend-ui", help="where 'save image' writes"), EXTRAPOLATE,
            json=False)
