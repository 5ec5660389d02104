"""``dblend ui``: live sliders for ``w`` and ``lambda`` that re-render the same seed.

A small local web app on the standard library's HTTP server (no web framework): the page has
one slider per expert weight, one for lambda, the class (digits) or prompt (sd) and the seed;
every change asks ``/render`` for new images, the mean rewards and the Pareto plot with the
current point. The server validates every input with the library's own checks (the same errors
as the CLI, shown in the page; the server keeps running), binds to localhost by default, and
writes only into its output directory (``/save``).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from diffusion_blend.errors import UsageError

log = logging.getLogger(__name__)


def images_png(x0: torch.Tensor, scale: int = 8) -> str:
    """Digits ``[N, 1, 8, 8]`` in [-1, 1] side by side as one PNG data URL (ink is dark)."""
    from diffusion_blend.io import image_row

    return _png_url(image_row(1 - (x0.clamp(-1, 1) + 1) / 2, scale))


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class DigitsSession:
    """The shipped digits base and experts, loaded once; renders like ``dblend sample digits``
    (the same dispatcher, so the numbers shown equal the command's for the same seed)."""

    kind, n = "digits", 8

    def __init__(self, experts: list[str], allow_extrapolation: bool = False):
        from diffusion_blend.domains.digits import DigitsDomain

        self.experts, self.allow = list(experts), allow_extrapolation
        self.domain = DigitsDomain(self.experts)
        self.front = self._expert_points()

    def _expert_points(self) -> dict[str, list[float]]:
        """Mean rewards of the pretrained model and each expert (for the Pareto plot)."""
        from diffusion_blend.evaluation.sample import SampleConfig, run_sample

        k, out = len(self.experts), {}
        for name, method, i in [("pretrained", "pretrained", 0)] + [
                (e, "db-mpa", i) for i, e in enumerate(self.experts)]:
            w = tuple(float(j == i) for j in range(k))
            summary, _ = run_sample(self.domain, SampleConfig(method, w, n=50, seed=900_000))
            out[name] = summary["mean_rewards"][:2]
        return out

    def render(self, q: dict) -> dict:
        from diffusion_blend.domains.digits import check_class
        from diffusion_blend.evaluation.sample import SampleConfig, run_sample

        w = tuple(_number(q, f"w{i}") for i in range(len(self.experts)))
        cfg = SampleConfig("db-mpa", w, _number(q, "lam"), self.allow, self.n,
                           int(_number(q, "seed")))
        cls = check_class(_text(q, "class", "0"))
        seeds = range(cfg.seed, cfg.seed + cfg.n)
        summary, x0 = run_sample(self.domain, cfg, cond=self.domain.cond(seeds, cls))
        summary |= {"class": cls, "experts": self.experts, "mean_rewards": dict(zip(
            self.experts, summary["mean_rewards"], strict=True))}
        return summary | {"image": images_png(x0), "pareto": self.pareto(summary)}

    def pareto(self, summary: dict) -> dict | None:
        """The experts' points and the current one, drawn by the page (no plotting here)."""
        if len(self.experts) < 2:
            return None
        a, b = self.experts[:2]
        r = summary["mean_rewards"]
        return {"axes": [a, b], "front": self.front, "point": [r[a], r[b]]}


class SdSession:
    """A local diffusers pipeline with LoRA experts, loaded once; renders like ``dblend sample
    sd`` (the same dispatcher); the preference and the prompt change per request."""

    kind, n = "sd", 1

    def __init__(self, model: str, experts: list[str], steps: int = 30, guidance: float = 7.5,
                 allow_extrapolation: bool = False):
        from diffusion_blend.domains.sd import SdDomain

        self.experts = [str(e) for e in experts]
        self.domain = SdDomain(model, self.experts, ["a photo of an apple"], steps=steps,
                               guidance=guidance)
        self.allow = allow_extrapolation

    def render(self, q: dict) -> dict:
        from diffusion_blend.evaluation.sample import SampleConfig, run_sample
        from diffusion_blend.io import image_row

        w = tuple(_number(q, f"w{i}") for i in range(len(self.experts)))
        cfg = SampleConfig("db-mpa", w, _number(q, "lam"), self.allow, self.n,
                           int(_number(q, "seed")))
        prompt = _text(q, "prompt", "a photo of an apple")
        self.domain.set_prompts([prompt])
        summary, x0 = run_sample(self.domain, cfg)
        return summary | {"prompt": prompt, "mean_rewards": {}, "pareto": None,
                          "image": _png_url(image_row(self.domain.images(x0)))}


def _number(q: dict, name: str) -> float:
    raw = _text(q, name, None)
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise UsageError(f"{name}={raw!r} must be finite")
    return v


def _text(q: dict, name: str, default):
    vals = q.get(name)
    if not vals:
        if default is None:
            raise UsageError(f"{name} is missing")
        return default
    return vals[0]


# ---------------------------------------------------------------------------- the server


IDLE_TIMEOUT_S = 30     # a connection that sends nothing for this long is closed
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """One log line per failed connection (a client that went away), not a traceback."""
        import sys

        log.info("ui: connection from %s ended: %s", client_address[0], sys.exc_info()[1])


def bind_server(host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """Bind the port first, so a port in use is an error before any model loads."""
    try:
        return _Server((host, port), BaseHTTPRequestHandler)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                         "choose another --port") from None
    except OverflowError:
        raise UsageError(f"--port {port} is not a port; use 1 ... 65535") from None


class UiServer:
    """The HTTP server around a session; one render at a time (models are shared)."""

    def __init__(self, session, out: Path, host: str = "127.0.0.1", port: int = 7860,
                 httpd: ThreadingHTTPServer | None = None):
        self.session, self.out, self.lock = session, Path(out), threading.Lock()
        self.last: dict | None = None
        self.httpd = httpd or bind_server(host, port)
        self.httpd.RequestHandlerClass = _handler(self)
        self.hosts = {*LOCAL_HOSTS, host}

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def render(self, q: dict) -> dict:
        with self.lock:
            out = self.session.render(q)
            self.last = out
            return out

    def save(self) -> dict:
        """Write the last rendered image into the output directory under a new server-chosen
        name; an existing file is never replaced (exclusive create, safe under concurrency)."""
        from diffusion_blend.io import atomic_write

        with self.lock:
            if self.last is None:
                raise UsageError("nothing rendered yet")
            data = base64.b64decode(self.last["image"].split(",", 1)[1])
        self.out.mkdir(parents=True, exist_ok=True)
        for i in itertools.count(len(list(self.out.glob("ui-*.png")))):
            path = self.out / f"ui-{i:04d}.png"
            try:
                atomic_write(path, lambda p: p.write_bytes(data), exclusive=True)
                return {"saved": str(path)}
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> threading.Thread:
        th = threading.Thread(target=self.serve_forever, daemon=True)
        th.start()
        return th

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(app: UiServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT_S

        def log_message(self, fmt, *args):   # through logging, not stderr
            log.debug(fmt, *args)

        def _host_ok(self) -> bool:
            """Only requests addressed to this machine (no DNS rebinding from a web page)."""
            host = urlparse(f"//{self.headers.get('Host', '')}").hostname or ""
            if host in app.hosts:
                return True
            self._json(403, {"error": f"Host {self.headers.get('Host')!r} is not served here"})
            return False

        def do_GET(self):
            url = urlparse(self.path)
            if not self._host_ok():
                return None
            if url.path == "/":
                return self._send(200, "text/html", page(app.session).encode())
            if url.path == "/save":
                return self._json(405, {"error": "/save changes files: use POST"})
            if url.path != "/render":
                return self._json(404, {"error": f"no page {url.path}"})
            return self._call(lambda: app.render(parse_qs(url.query)))

        def do_POST(self):
            if not self._host_ok():
                return None
            if urlparse(self.path).path != "/save":
                return self._json(404, {"error": f"no POST endpoint {self.path}"})
            return self._call(app.save)

        def _call(self, fn):
            try:
                return self._json(200, fn())
            except UsageError as e:
                return self._json(400, {"error": str(e)})
            except OSError as e:
                return self._json(500, {"error": f"failed: {e.strerror or e}"})

        def _json(self, code: int, obj: dict):
            self._send(code, "application/json", json.dumps(obj).encode())

        def _send(self, code: int, ctype: str, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def page(session) -> str:
    """The single HTML page: sliders, inputs, images, numbers; plain JavaScript."""
    lam_max = 2.0 if session.allow else 1.0
    k = len(session.experts)
    sliders = "".join(
        f'<label>{html.escape(Path(e).name)} <input type="range" id="w{i}" min="0" max="1" '
        f'step="0.05" value="{1 / k:.2f}"><span id="w{i}v"></span></label><br>'
        for i, e in enumerate(session.experts))
    cond = ('<label>class <input id="class" type="number" min="0" max="9" value="3"></label>'
            if session.kind == "digits" else
            '<label>prompt <input id="prompt" size="40" value="a photo of an apple"></label>')
    return _PAGE.format(sliders=sliders, cond=cond, lam_max=lam_max, k=k, kind=session.kind)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>diffusion-blend</title>
<style>body{{font-family:sans-serif;margin:1em}} #err{{color:#b00}} img{{image-rendering:pixelated}}
</style></head><body><h3>diffusion-blend: live preference sliders</h3>
{sliders}<label>lambda <input type="range" id="lam" min="0" max="{lam_max}" step="0.05"
value="1"><span id="lamv"></span></label><br>{cond}
<label>seed <input id="seed" type="number" value="0"></label>
<button id="save">save image</button>
<div id="err"></div><div><img id="img"></div>
<svg id="pareto" width="320" height="240" style="border:1px solid #ccc"></svg>
<pre id="numbers"></pre>
<script>
const K = {k}, KIND = "{kind}";
let pending = null, busy = false;
function params() {{
  const q = new URLSearchParams();
  for (let i = 0; i < K; i++) {{
    const v = document.getElementById("w" + i).value;
    q.set("w" + i, v); document.getElementById("w" + i + "v").textContent = " " + v;
  }}
  const lam = document.getElementById("lam").value;
  q.set("lam", lam); document.getElementById("lamv").textContent = " " + lam;
  q.set("seed", document.getElementById("seed").value);
  if (KIND == "digits") q.set("class", document.getElementById("class").value);
  else q.set("prompt", document.getElementById("prompt").value);
  return q;
}}
function drawPareto(p) {{
  const pts = Object.entries(p.front).concat([["current", p.point]]);
  const xs = pts.map(e => e[1][0]), ys = pts.map(e => e[1][1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = v => 30 + 270 * (v - x0) / (x1 - x0 || 1);
  const Y = v => 210 - 190 * (v - y0) / (y1 - y0 || 1);
  let svg = `<text x="150" y="235" font-size="11">${{p.axes[0]}}</text>` +
            `<text x="2" y="12" font-size="11">${{p.axes[1]}}</text>`;
  for (const [name, [x, y]] of pts) {{
    const c = name == "current" ? "red" : "#246";
    const r = name == "current" ? 6 : 4;
    svg += `<circle cx="${{X(x)}}" cy="${{Y(y)}}" r="${{r}}" fill="${{c}}"/>` +
           `<text x="${{X(x) + 7}}" y="${{Y(y) + 4}}" font-size="10">${{name}}</text>`;
  }}
  document.getElementById("pareto").innerHTML = svg;
}}
async function render() {{
  if (busy) {{ pending = true; return; }}
  busy = true; pending = false;
  const r = await fetch("/render?" + params().toString());
  const d = await r.json();
  if (!r.ok) {{ document.getElementById("err").textContent = d.error; }}
  else {{
    document.getElementById("err").textContent = "";
    document.getElementById("img").src = d.image;
    if (d.pareto) drawPareto(d.pareto);
    document.getElementById("numbers").textContent = JSON.stringify(
      {{mean_rewards: d.mean_rewards, w: d.w, lam: d.lam, seconds: d.seconds}}, null, 1);
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }}
  busy = false;
  if (pending) render();
}}
document.querySelectorAll("input").forEach(e => e.addEventListener("input", render));
document.getElementById("save").addEventListener("click", () => fetch("/save",
  {{method: "POST"}}));
render();
</script></body></html>"""


def run_ui(experts: list[str] | None = None, out: str | Path = "dblend-ui",
           host: str = "127.0.0.1", port: int = 7860, sd_model: str | None = None,
           allow_extrapolation: bool = False, steps: int = 30,
           httpd: ThreadingHTTPServer | None = None) -> UiServer:
    """Build the session (digits by default, or an sd pipeline) and its server (not started)."""
    if sd_model:
        session = SdSession(sd_model, experts or [], steps, allow_extrapolation=allow_extrapolation)
    else:
        from diffusion_blend.domains.digits import PAIR

        session = DigitsSession(list(experts or PAIR), allow_extrapolation)
    return UiServer(session, Path(out), host, port, httpd)
