"""``dblend ui`` on the shipped digits model: the session's contract (the CLI's numbers, the
server-side checks, the fronts), the Gradio app called as a client, then a real headless
browser (chromium + chromedriver, started by the test) moving a slider and switching method."""

import json
import os
import shutil
import socket
import sys
import threading
import time

import pytest

from diffusion_blend.cli import main
from diffusion_blend.errors import UsageError

pytestmark = pytest.mark.slow
pytest.importorskip("gradio")     # the ui extra (in the test extra, so CI always has it)
PARTICLES = 4


@pytest.fixture(scope="module")
def session():
    from diffusion_blend.ui import ImageSession

    class Small(ImageSession):
        n_point = 8          # the fronts and the point on 8 seeds, not 32: the same code, faster

    session = Small("digits", ["ink", "smooth"], smc_particles=PARTICLES)
    yield session
    session.close()      # after the app: no server thread left inside torch at exit


def cli_sample(capsys, cls, w, lam, seed, method="db-mpa"):
    assert main(["sample", "digits", "--class", str(cls), "--experts", "ink,smooth", "--w",
                 w, "--lam", str(lam), "--n", "8", "--seed", str(seed), "--method", method,
                 "--particles", str(PARTICLES), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["mean_rewards"]


@pytest.mark.parametrize("method", ["db-mpa", "amortised", "smc"])
def test_a_render_shows_the_cli_numbers_for_the_same_seed(session, capsys, method):
    out = session.render(method, [0.3, 0.7], 0.8, False, 4, 11)
    assert out.summary["mean_rewards"] == cli_sample(capsys, 4, "0.3,0.7", 0.8, 11, method)
    assert out.image.size == (8 * 8 * 16, 8 * 16)          # eight digits, 128 px each
    assert "| ink |" in out.readout and "| smooth |" in out.readout


@pytest.mark.parametrize("args, msg", [
    (("db-mpa", [0.3, 0.7], 1.0, False, 12, 0), "classes are 0-9"),
    (("db-mpa", ["abc", 0.7], 1.0, False, 1, 0), "w0='abc' is not a finite number"),
    (("db-mpa", [0.3, 0.7], 1.5, False, 1, 0), "extrapolat"),
    (("db-mpa", [-0.3, 0.7], 1.0, False, 1, 0), "negative"),
    (("db-mpa", [0.8, 0.8], 1.0, False, 1, 0), "lam * sum(w)"),
    (("nope", [0.3, 0.7], 1.0, False, 1, 0), "method 'nope' is not known"),
    (("db-mpa", [0.3, 0.7], 1.0, False, 1, 1.5), "seed=1.5 is not a whole number"),
    (("db-mpa", [0.3, 0.7], float("nan"), False, 1, 0), "lam=nan"),
    (("amortised", [0.3, 0.7], 2.5, True, 1, 0), "lam=2.5 is not allowed"),
])
def test_bad_requests_are_refused_on_the_server(session, args, msg):
    with pytest.raises(UsageError, match=msg.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        session.render(*args)


def test_the_current_point_sits_on_the_fronts_it_is_drawn_with(session):
    """At lambda 1 the point of DB-MPA (and of the soup) at w = 0.5 is the front's point there:
    the same fixed seeds, so the point does not jitter as the sliders move."""
    fronts = session.fronts
    assert [w for w, _ in fronts["db-mpa"]] == [i / 10 for i in range(11)]
    assert [w for w, _ in fronts["morl"]] == [0.25, 0.5, 0.75]       # the shipped MORL adapters
    for method in ("db-mpa", "soup"):
        point = session.render(method, [0.5, 0.5], 1.0, False, 3, 7).summary["point"]
        assert point == dict(fronts[method])[0.5]
    # the soup at a vertex is that expert bit for bit: the two fronts meet there
    assert dict(fronts["soup"])[1.0] == dict(fronts["db-mpa"])[1.0]
    assert session.render("amortised", [0.5, 0.5], 1.0, False, 3, 7).figure is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(session):
    from diffusion_blend.ui import build_app

    demo = build_app(session)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, ssr_mode=False)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


def test_a_client_gets_the_cli_numbers_and_bad_values_are_errors(app, capsys):
    from gradio_client import Client

    client = Client(app[1], verbose=False)
    image, readout, plot = client.predict("db-mpa", 0.3, 0.7, 0.8, False, 4, 11,
                                          api_name="/render")
    shown = cli_sample(capsys, 4, "0.3,0.7", 0.8, 11)
    assert f"| ink | {shown[0]:+.3f} |" in readout and os.path.exists(image)
    # the page's limits are not trusted: Gradio checks the sliders' ranges, the session the rest
    with pytest.raises(Exception, match="maximum value 1"):
        client.predict("db-mpa", 0.3, 0.7, 1.9, False, 4, 11, api_name="/render")
    with pytest.raises(Exception, match=r"lam \* sum\(w\)"):
        client.predict("db-mpa", 0.8, 0.8, 1.0, False, 4, 11, api_name="/render")


def test_close_waits_for_the_render_in_flight_and_refuses_the_next():
    """A daemon server thread still inside torch at interpreter exit aborts the process:
    ``close`` returns only after the work in flight, and no work starts after it."""
    from diffusion_blend.ui import Session

    session, inside, release, order = Session(), threading.Event(), threading.Event(), []

    def render():
        inside.set()
        release.wait(30)
        order.append("rendered")

    worker = threading.Thread(target=session.serve, args=(render,))
    worker.start()
    assert inside.wait(30)
    closer = threading.Thread(target=lambda: (session.close(), order.append("closed")))
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and order == []          # close waits for the render
    release.set()
    worker.join(30), closer.join(30)
    assert order == ["rendered", "closed"]
    with pytest.raises(UsageError, match="closed"):
        session.serve(render)
    assert order == ["rendered", "closed"]


def test_a_port_in_use_is_refused_before_models_load(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["ui", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


def test_without_gradio_the_command_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusion-blend[ui]" in err[0]


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _wait(cond, timeout=90.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - the page is still being built
            pass
        time.sleep(0.2)
    raise AssertionError("the page did not update in time")


def test_a_real_browser_moves_a_slider_and_switches_method(app, capsys, tmp_path):
    if not (shutil.which("chromedriver") and (shutil.which("chromium")
                                              or shutil.which("chromium-browser"))):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("no chromium / chromedriver on this machine")
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _driver()
    readout = lambda: driver.find_element(By.ID, "readout").text  # noqa: E731
    try:
        driver.get(app[1])
        _wait(lambda: "db-mpa" in readout() and "w = (0.5, 0.5)" in readout())
        driver.find_element(By.CSS_SELECTOR, "#w0 input[type=range]").send_keys(Keys.ARROW_LEFT)
        _wait(lambda: "w = (0.45, 0.5)" in readout())                   # a real key press
        shown = cli_sample(capsys, 3, "0.45,0.5", 1.0, 0)
        assert f"ink {shown[0]:+.3f}" in readout() and f"smooth {shown[1]:+.3f}" in readout()
        driver.find_element(By.CSS_SELECTOR, "#method input[value=amortised]").click()
        _wait(lambda: "amortised" in readout() and "w = (0.45, 0.5)" in readout())
        art = os.environ.get("DBLEND_TEST_ARTIFACTS", str(tmp_path))
        os.makedirs(art, exist_ok=True)
        assert driver.save_screenshot(os.path.join(art, "ui.png"))
    finally:
        driver.quit()
