"""``dblend ui`` on the shipped digits model: the server's contract, then a real headless
browser (chromium + chromedriver, started by the test) moving a slider."""

import base64
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffusion_blend.cli import main
from diffusion_blend.ui import UiServer, run_ui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("ui") / "out"
    srv = run_ui(out=out, port=0)
    srv.start()
    yield srv
    srv.stop()


def get(server, path):
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cli_sample(capsys, cls, w, lam, seed):
    assert main(["sample", "digits", "--class", str(cls), "--experts", "ink,smooth", "--w",
                 w, "--lam", str(lam), "--n", "8", "--seed", str(seed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return dict(zip(out["reward_names"], out["mean_rewards"], strict=True))


def test_render_matches_the_cli_and_bad_input_is_an_error_in_the_page(server, capsys):
    code, body = get(server, "/render?w0=0.3&w1=0.7&lam=0.8&class=4&seed=11")
    d = json.loads(body)
    assert code == 200 and d["image"].startswith("data:image/png;base64,") and d["pareto"]
    assert d["mean_rewards"] == cli_sample(capsys, 4, "0.3,0.7", 0.8, 11)
    for query, msg in (("w0=0.3&w1=0.7&lam=1&class=12&seed=0", "classes are 0-9"),
                       ("w0=abc&w1=0.7&lam=1&class=1&seed=0", "not a number"),
                       ("w0=0.3&w1=0.7&lam=1.5&class=1&seed=0", "extrapolat"),
                       ("w0=-0.3&w1=0.7&lam=1&class=1&seed=0", "negative"),
                       ("w0=0.3&lam=1&class=1&seed=0", "w1 is missing")):
        code, body = get(server, "/render?" + query)
        assert code == 400 and msg in json.loads(body)["error"]
    assert get(server, "/render?w0=0.5&w1=0.5&lam=1&class=1&seed=0")[0] == 200  # still serving
    assert get(server, "/nope")[0] == 404


def test_extrapolating_sliders_are_refused_in_the_page(server):
    code, body = get(server, "/render?w0=0.8&w1=0.8&lam=1&class=1&seed=0")
    assert code == 400 and "lam * sum(w)" in json.loads(body)["error"]


class FakeSession:
    """The server's contract without a model: renders a fixed 1x1 PNG."""

    kind, experts, allow = "digits", ["a", "b"], False

    def render(self, q):
        return {"image": "data:image/png;base64," + base64.b64encode(b"png").decode()}


@pytest.fixture
def fake(tmp_path):
    srv = UiServer(FakeSession(), tmp_path / "out", port=0)
    srv.start()
    yield srv
    srv.stop()


def request(server, path, method="GET", host=None):
    req = urllib.request.Request(server.url.rstrip("/") + path, method=method,
                                 headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_saves_are_post_only_never_overwrite_and_stay_in_the_output_directory(fake):
    assert request(fake, "/save", "POST")[0] == 400          # nothing rendered yet
    assert request(fake, "/render?x=1")[0] == 200
    code, body = request(fake, "/save?path=/etc/passwd")
    assert code == 405 and "POST" in body["error"]
    (fake.out).mkdir(exist_ok=True)
    (fake.out / "ui-0000.png").write_bytes(b"an earlier image")
    with ThreadPoolExecutor(10) as pool:
        saved = list(pool.map(lambda _: request(fake, "/save?path=/etc/passwd", "POST"),
                              range(10)))
    paths = [body["saved"] for code, body in saved if code == 200]
    assert len(paths) == 10 and len(set(paths)) == 10
    assert all(os.path.dirname(p) == str(fake.out) for p in paths)
    assert (fake.out / "ui-0000.png").read_bytes() == b"an earlier image"


def test_only_local_host_headers_are_served(fake):
    code, body = request(fake, "/render?x=1", host="evil.example:7860")
    assert code == 403 and "evil.example" in body["error"]
    assert request(fake, "/render?x=1", host=f"localhost:{fake.httpd.server_address[1]}")[0] \
        == 200
    assert request(fake, "/save", "POST", host="evil.example")[0] == 403


def test_a_failed_save_is_a_json_error_and_the_server_goes_on(fake):
    request(fake, "/render?x=1")
    fake.out.parent.mkdir(exist_ok=True)
    fake.out.write_text("a file where the output directory should be")
    code, body = request(fake, "/save", "POST")
    assert code == 500 and "failed" in body["error"]
    assert request(fake, "/render?x=1")[0] == 200


def test_idle_connections_time_out_and_disconnects_log_one_line(fake, caplog, monkeypatch,
                                                                capfd):
    import diffusion_blend.ui as ui

    monkeypatch.setattr(fake.httpd.RequestHandlerClass, "timeout", 0.5)
    caplog.set_level(logging.INFO, logger=ui.__name__)
    host, port = fake.httpd.server_address[:2]
    with socket.create_connection((host, port)) as s:   # says nothing: closed by the server
        s.settimeout(5)
        assert s.recv(1) == b""
    with socket.create_connection((host, port)) as s:   # goes away mid-request
        s.sendall(b"GET /render?x=1 HTTP/1.1\r\nHost: localhost\r\n")
    time.sleep(1.0)
    records = [r for r in caplog.records if r.name == ui.__name__]
    assert records and all("\n" not in r.getMessage() and not r.exc_info for r in records)
    assert "Traceback" not in capfd.readouterr().err


def test_a_port_in_use_is_refused_before_models_load(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["ui", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,1200"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _wait(driver, cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("the page did not update in time")


@pytest.mark.slow
def test_a_real_browser_moves_a_slider_and_sees_the_cli_numbers(server, capsys, tmp_path):
    if not (shutil.which("chromedriver") and (shutil.which("chromium")
                                              or shutil.which("chromium-browser"))):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("no chromium / chromedriver on this machine")
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _driver()
    try:
        driver.get(server.url)
        renders = lambda: int(driver.find_element(By.TAG_NAME, "body")  # noqa: E731
                              .get_attribute("data-renders") or 0)
        _wait(driver, lambda: renders() >= 1)
        before = driver.find_element(By.ID, "img").get_attribute("src")
        slider = driver.find_element(By.ID, "w0")
        slider.send_keys(Keys.ARROW_LEFT)                  # 0.50 -> 0.45, a real key press
        _wait(driver, lambda: renders() >= 2
              and driver.find_element(By.ID, "w0").get_attribute("value") == "0.45"
              and driver.find_element(By.ID, "img").get_attribute("src") != before)
        _wait(driver, lambda: json.loads(driver.find_element(By.ID, "numbers").text)["w"][0]
              == 0.45)
        shown = json.loads(driver.find_element(By.ID, "numbers").text)
        assert shown["mean_rewards"] == cli_sample(capsys, 3, "0.45,0.5", 1.0, 0)
        art = os.environ.get("DBLEND_TEST_ARTIFACTS", str(tmp_path))
        os.makedirs(art, exist_ok=True)
        assert driver.save_screenshot(os.path.join(art, "ui.png"))
    finally:
        driver.quit()
