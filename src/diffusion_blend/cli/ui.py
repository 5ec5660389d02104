"""``dblend ui``: live sliders for w and lambda (a Gradio app; the ``ui`` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from diffusion_blend.cli.args import EXTRAPOLATE, arg, command, port_int, positive_int, threads
from diffusion_blend.errors import UsageError


def cmd_ui(a: argparse.Namespace) -> None:
    from diffusion_blend.ui import check_port, make_session

    threads(a.threads)
    experts = [e for e in (a.experts or "").split(",") if e] or None
    if a.sd_model and not experts:
        raise UsageError("--sd-model needs --experts (LoRA directories)")
    if a.amortised and not a.sd_model:
        raise UsageError("--amortised is for --sd-model (the image domains ship theirs)")
    if importlib.util.find_spec("gradio") is None:     # found, not imported: that takes 3 s
        raise UsageError("dblend ui needs Gradio: pip install 'diffusion-blend[ui]'")
    check_port(a.host, a.port)        # a port in use is an error before gradio or models load
    from diffusion_blend.ui import build_app

    session = make_session(experts, a.sd_model, a.steps, a.amortised, a.domain)
    app = build_app(session, a.allow_extrapolation)
    sys.stderr.write(f"dblend ui: serving http://{a.host}:{a.port}/ (Ctrl-C stops)\n")
    try:
        app.launch(server_name=a.host, server_port=a.port, share=False, ssr_mode=False,
                   quiet=True)
    finally:
        app.close(verbose=False)
        session.close()     # no render left inside torch when the interpreter exits


def register(sub: Any) -> None:
    command(sub, "ui", cmd_ui, "live sliders for w and lambda (a local Gradio app)",
            arg("--domain", default="fashion", choices=("fashion", "digits")),
            arg("--experts", default=None, help="the domain's expert names (default: its pair) "
                "or sd LoRA dirs"),
            arg("--sd-model", default=None, help="a local diffusers pipeline instead of "
                "--domain"),
            arg("--steps", type=positive_int, default=30, help="sd sampling steps"),
            arg("--amortised", default=None, help="sd: a `dblend distill sd` output (the "
                "amortised method)"),
            arg("--host", default="127.0.0.1"), arg("--port", type=port_int, default=7860),
            EXTRAPOLATE, json=False)
