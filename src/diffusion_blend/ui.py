"""``dblend ui``: live sliders for ``w`` and ``lambda`` on a Gradio app (``pip install
diffusion-blend[ui]``; ``app.py`` serves the same app as a Hugging Face Space).

One slider per expert weight, one for lambda (up to 2 behind the extrapolation toggle), a
method switch (DB-MPA, amortised, soup, SMC) that re-renders the *same* seed, and the class
(fashion, digits) or prompt (sd). Each render shows the samples drawn large, the rewards of
those samples and, on fixed seeds shared with the fronts, the current point on the Pareto plot:
DB-MPA's and the soup's fronts over ``w`` at lambda 1 with the MORL adapters' points, measured
once at start.
Every input is checked on the server with the library's own checks (the CLI's messages, shown
in the page; the server keeps running): the page's limits are not trusted.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_blend.blend import Preference
from diffusion_blend.errors import UsageError

METHODS = ("db-mpa", "amortised", "soup", "smc")
FRONT_W = tuple(i / 10 for i in range(11))
MORL_W = tuple(i / 20 for i in range(1, 20))     # interior: MORL at a vertex is the expert
LAM_MAX = 2.0              # the lambda slider's end (with extrapolation on)
POINT_SEED = 900_000       # the fronts' and the current point's seeds (fixed: no jitter)


@dataclass
class Render:
    """What one render shows: the samples, their read-out, the plot, the summary behind it."""

    image: Any                 # PIL image, the samples side by side
    readout: str               # Markdown table of the rewards
    figure: Any                # matplotlib Figure, or None where no rewards are known
    summary: dict


def check_request(method: str, w: list[float], lam: float, allow: bool, seed: float,
                  n: int, k: int) -> tuple[Preference, int]:
    """The request as the library reads it: a ``UsageError`` naming the first bad value."""
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not known; use one of {METHODS}")
    for name, v in [*((f"w{i}", x) for i, x in enumerate(w)), ("lam", lam)]:
        finite(name, v)
    if not 0 <= lam <= LAM_MAX:
        raise UsageError(f"lam={lam} is not allowed; lambda goes 0 ... {LAM_MAX:g} here")
    from diffusion_blend.seeding import check_seed_range

    check_seed_range(whole("seed", seed), n)
    return Preference.for_experts(tuple(float(x) for x in w), k, float(lam), allow), int(seed)


def finite(name: str, v: Any) -> float:
    """``v`` as a finite float, or a ``UsageError`` naming it."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise UsageError(f"{name}={v!r} is not a finite number")
    return float(v)


def whole(name: str, v: Any) -> int:
    """``v`` as an integer (``3.0`` is 3), or a ``UsageError`` naming it."""
    if finite(name, v) != int(v):
        raise UsageError(f"{name}={v!r} is not a whole number")
    return int(v)


class Session:
    """What a session serves: ``sample`` (the samples and their rewards: what a slider move
    waits for), ``place`` (their point on the fronts, where the session has any), and
    ``render``, both at once (what clients call)."""

    fronts: dict = {}
    methods: tuple[str, ...] = METHODS   # what the method switch offers

    def __init__(self) -> None:
        self._lock, self._closed = threading.Lock(), False

    def serve(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``, one at a time, unless the session is closed: the server's threads
        are daemons, and one still inside torch when the interpreter exits aborts it."""
        with self._lock:
            if self._closed:
                raise UsageError("this session is closed; start `dblend ui` again")
            return fn(*args)

    def close(self) -> None:
        """Wait for the work in flight, then refuse any more (call after the app closes)."""
        with self._lock:
            self._closed = True

    def render(self, method: str, w: list[float], lam: float, allow: bool, cond: Any,
               seed: float) -> Render:
        return self.place(self.sample(method, w, lam, allow, cond, seed))

    def place(self, shown: Render) -> Render:
        return shown


class ImageSession(Session):
    """An image domain's shipped base and experts (fashion, digits), loaded once; renders like
    ``dblend sample DOMAIN`` (the same dispatcher, so the numbers shown equal the command's for
    the same seed)."""

    kind, n_show, n_point = "image", 8, 32

    def __init__(self, domain: str, experts: list[str] | None = None, smc_particles: int = 8):
        from diffusion_blend.domains import image_domain
        from diffusion_blend.evaluation.methods import MethodConfig

        super().__init__()
        self.domain = image_domain(domain)(experts)
        self.spec, self.experts = self.domain.spec, list(self.domain.names)
        self.mcfg = MethodConfig(smc_particles=smc_particles)
        self.fronts = self._fronts()
        if self.domain.amortised(Preference((0.5,) * len(self.experts))) is None:
            self.methods = tuple(m for m in METHODS if m != "amortised")   # none shipped

    def _mean(self, method: str, pref: Preference) -> list[float] | None:
        """Mean rewards of ``method`` at ``pref`` on the fixed point seeds (None: missing)."""
        from diffusion_blend.evaluation.methods import run_method

        seeds = list(range(POINT_SEED, POINT_SEED + self.n_point))
        out = run_method(method, self.domain, pref, seeds, self.mcfg)
        if out is None:
            return None
        with torch.no_grad():
            r = out.estimates if out.estimates is not None else self.domain.rewards(
                out.x0, **self.domain.cond(seeds))
        return [float(v) for v in r.double().mean(0)]

    def _fronts(self) -> dict[str, list[tuple[float, list[float]]]]:
        """DB-MPA's and the soup's points over ``FRONT_W`` at lambda 1, MORL's wherever an
        adapter exists (probed on ``MORL_W``), the pretrained model's (two experts: the axes)."""
        if len(self.experts) != 2:
            return {}
        out: dict[str, list] = {}
        for method, grid in (("db-mpa", FRONT_W), ("soup", FRONT_W), ("morl", MORL_W)):
            means = [(w1, self._mean(method, Preference((w1, round(1 - w1, 10)))))
                     for w1 in grid]
            out[method] = [(w1, m) for w1, m in means if m is not None]
        out["pretrained"] = [(0.0, self._mean("pretrained", Preference((0.5, 0.5))))]
        return out

    def sample(self, method: str, w: list[float], lam: float, allow: bool, cls: Any,
               seed: float) -> Render:
        """The samples of ``seed ...`` and their rewards (no point, no plot: the fast part a
        slider move waits for)."""
        from diffusion_blend.evaluation.sample import SampleConfig, run_sample
        from diffusion_blend.io import image_row

        pref, seed = check_request(method, w, lam, allow, seed, self.n_show, len(self.experts))
        if method not in self.methods:
            raise UsageError(f"method {method!r} is not available here; use one of "
                             f"{self.methods}")
        cls = self.spec.check_class(cls if isinstance(cls, str) else whole("class", cls))
        start = time.perf_counter()
        cond = self.domain.cond(range(seed, seed + self.n_show), cls)
        summary, x0 = run_sample(self.domain, SampleConfig(method, pref.w, pref.lam, allow,
                                                           self.n_show, seed), self.mcfg, cond)
        summary |= {"class": cls, "point": None, "point_seeds": self.n_point,
                    "seconds": time.perf_counter() - start}
        image = image_row(1 - (x0.clamp(-1, 1) + 1) / 2, 128 // self.spec.size)  # 128 px each
        return Render(image, readout(summary), None, summary)

    def place(self, shown: Render) -> Render:
        """``shown`` with its point on the fixed seeds of the fronts, and the plot."""
        if not self.fronts:
            return shown
        s = shown.summary
        point = self._mean(s["method"], Preference(tuple(s["w"]), s["lam"], True))
        summary = s | {"point": point}
        return Render(shown.image, readout(summary),
                      pareto_figure(self.fronts, self.experts, point, s["method"]), summary)


class SdSession(Session):
    """A local diffusers pipeline with LoRA experts, loaded once; renders like ``dblend sample
    sd`` (the same dispatcher); the preference and the prompt change per request."""

    kind, n_show = "sd", 1

    def __init__(self, model: str, experts: list[str], steps: int = 30, guidance: float = 7.5,
                 amortised: str | None = None):
        from diffusion_blend.domains.sd import SdDomain
        from diffusion_blend.evaluation.methods import MethodConfig

        super().__init__()
        self.experts = [str(e) for e in experts]
        self.domain = SdDomain(model, self.experts, ["a photo of an apple"], steps=steps,
                               guidance=guidance, amortised=amortised)
        self.mcfg = MethodConfig(smc_particles=4)

    def sample(self, method: str, w: list[float], lam: float, allow: bool, prompt: Any,
               seed: float) -> Render:
        from diffusion_blend.evaluation.sample import SampleConfig, run_sample
        from diffusion_blend.io import image_row

        pref, seed = check_request(method, w, lam, allow, seed, self.n_show, len(self.experts))
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("prompt is empty; type what to draw")
        start = time.perf_counter()
        self.domain.set_prompts([prompt])
        summary, x0 = run_sample(self.domain, SampleConfig(method, pref.w, pref.lam, allow,
                                                           self.n_show, seed), self.mcfg)
        summary |= {"prompt": prompt, "seconds": time.perf_counter() - start}
        return Render(image_row(self.domain.images(x0)), readout(summary), None,
                      summary)

def readout(summary: dict) -> str:
    """The rewards as a labelled table: the samples shown, and the fixed-seed point."""
    names = summary.get("reward_names") or []
    if not names:
        return f"{summary['method']} · {summary['seconds']:.2f} s (no rewards configured)"
    point = summary.get("point") or [None] * len(names)
    rows = [f"| {n} | {m:+.3f} | {'-' if p is None else f'{p:+.3f}'} |"
            for n, m, p in zip(names, summary["mean_rewards"], point, strict=True)]
    return "\n".join([f"**{summary['method']}** at w = {_fmt(summary['w'])}, lambda = "
                      f"{summary['lam']:g} · rendered in {summary['seconds']:.2f} s", "",
                      f"| reward (normalised) | these samples | {summary.get('point_seeds')} "
                      "fixed seeds |", "|---|---|---|",
                      *rows])


def _fmt(w: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in w) + ")"


def pareto_figure(fronts: dict, axes: list[str], point: list[float] | None, method: str):
    """DB-MPA's and the soup's fronts (lines over w), MORL's points, the pretrained model's and
    the current point, on the first two rewards (a new Figure: no global pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), dpi=90)
    ax = fig.add_axes((0.14, 0.12, 0.82, 0.84))   # fixed margins: no layout pass per render
    style = {"db-mpa": dict(color="C0", marker="o", ls="-", label="DB-MPA front (lambda 1)"),
             "soup": dict(color="C2", marker=".", ls="--", label="rewarded soup"),
             "morl": dict(color="C3", marker="s", ls="none", ms=8, label="MORL (fine-tuned per w)"),
             "pretrained": dict(color="k", marker="x", ls="none", ms=9, label="pretrained")}
    for name, pts in fronts.items():
        if pts:
            ax.plot([p[1][0] for p in pts], [p[1][1] for p in pts], **style[name])
    if point is not None:
        ax.plot(*point[:2], marker="*", color="C1", ms=18, ls="none", label=f"current ({method})")
    ax.set_xlabel(f"{axes[0]} (mean, normalised)")
    ax.set_ylabel(f"{axes[1]} (mean, normalised)")
    ax.legend(fontsize=8, loc="upper right")      # a fixed place: "best" searches each time
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------- the app


def check_port(host: str, port: int) -> None:
    """A port that cannot be listened on is an error before any model loads."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                         "choose another --port") from None
    except OverflowError:
        raise UsageError(f"--port {port} is not a port; use 1 ... 65535") from None


def build_app(session, allow_extrapolation: bool = False):
    """The Gradio Blocks app around a session (not launched)."""
    import gradio as gr

    with gr.Blocks(title="diffusion-blend", analytics_enabled=False) as app:
        gr.Markdown("## diffusion-blend: one preference, any mix of the experts, live\n"
                    "Move a slider: the same seed is redrawn with the blended backward "
                    "process `eps_pre + lambda * sum_i w_i (eps_i - eps_pre)`.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                method, ws, lam, extrapolate, cond, seed = _controls(gr, session,
                                                                     allow_extrapolation)
            with gr.Column(scale=2):
                image = gr.Image(label="samples (the same seed for every method)", type="pil",
                                 elem_id="img", show_label=True, height=180)
                text = gr.Markdown(elem_id="readout")
                plot = gr.Plot(label="Pareto front", elem_id="pareto")
        inputs, outputs = [method, *ws, lam, extrapolate, cond, seed], [image, text, plot]
        last = gr.State(None)       # the samples just shown, for the plot that follows

        def call(fn, *args):
            try:
                return session.serve(fn, *args)
            except UsageError as e:
                raise gr.Error(str(e)) from None

        def render(method, *values):                 # the whole render: what clients call
            out = call(session.render, method, *_request(values))
            return out.image, out.readout, out.figure

        def show(method, *values):                   # a slider move: the samples first ...
            out = call(session.sample, method, *_request(values))
            return out.image, out.readout, out

        def place(shown):                            # ... then their point on the fronts
            if shown is None:
                return gr.skip(), gr.skip()
            out = call(session.place, shown)
            return out.readout, out.figure

        app.load(render, inputs, outputs, api_name="render")     # what clients call
        for component in inputs:     # the page's own events
            component.change(show, inputs, [image, text, last], trigger_mode="always_last",
                             show_progress="hidden", api_visibility="private").then(
                place, last, [text, plot], show_progress="hidden", api_visibility="private")
        extrapolate.change(lambda on, v: gr.update(maximum=LAM_MAX if on else 1,
                                                   value=min(v, LAM_MAX if on else 1)),
                           [extrapolate, lam], lam, api_visibility="private")
    return app


def _controls(gr, session, allow_extrapolation: bool) -> tuple:
    """The left column's inputs: method, one slider per expert weight, lambda, its
    extrapolation toggle, the class (or prompt) and the seed."""
    k = len(session.experts)
    ws = [gr.Slider(0, 1, value=round(1 / k, 2), step=0.05, elem_id=f"w{i}",
                    label=f"w: {name.rsplit('/', 1)[-1]}")
          for i, name in enumerate(session.experts)]
    extrapolate = gr.Checkbox(allow_extrapolation, elem_id="extrapolate",
                              label="extrapolate (lambda up to 2)")
    lam = gr.Slider(0, LAM_MAX if allow_extrapolation else 1, value=1, step=0.05,
                    label="lambda (KL-strength modifier)", elem_id="lam")
    method = gr.Radio(list(session.methods), value="db-mpa", label="method", elem_id="method")
    classes = ", ".join(f"{i} {c}" for i, c in enumerate(getattr(session.spec, "classes", ())))
    cond = (gr.Slider(0, len(session.spec.classes) - 1, value=3, step=1,
                      label="class: " + classes, elem_id="class")
            if session.kind == "image" else
            gr.Textbox("a photo of an apple", label="prompt", elem_id="prompt"))
    seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
    return method, ws, lam, extrapolate, cond, seed


def _request(values: tuple) -> tuple:
    """The app's slider values as a session's arguments ``(w, lam, allow, cond, seed)``."""
    *w, lam, allow, cond, seed = values
    return list(w), lam, bool(allow), cond, seed


def make_session(experts: list[str] | None = None, sd_model: str | None = None,
                 steps: int = 30, amortised: str | None = None, domain: str = "fashion"):
    """An image domain's session (its shipped pair by default) or an sd pipeline's (with its
    distilled blend for the amortised method, where given)."""
    if sd_model:
        return SdSession(sd_model, experts or [], steps, amortised=amortised)
    return ImageSession(domain, experts)
