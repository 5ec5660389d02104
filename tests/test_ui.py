"""``dblend ui`` on the shipped digits model: the server's contract, then a real headless
browser (chromium + chromedriver, started by the test) moving a slider."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from diffusion_blend.cli import main
from diffusion_blend.ui import run_ui


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
    return json.loads(capsys.readouterr().out)["mean_rewards"]


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


def test_save_writes_only_into_the_output_directory(server):
    code, body = get(server, "/save?path=/etc/passwd")
    saved = json.loads(body)["saved"]
    assert code == 200 and os.path.dirname(saved) == str(server.out)


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
        slider.send_keys(Keys.ARROW_RIGHT)                 # 0.50 -> 0.55, a real key press
        _wait(driver, lambda: renders() >= 2
              and driver.find_element(By.ID, "w0").get_attribute("value") == "0.55"
              and driver.find_element(By.ID, "img").get_attribute("src") != before)
        _wait(driver, lambda: json.loads(driver.find_element(By.ID, "numbers").text)["w"][0]
              == 0.55)
        shown = json.loads(driver.find_element(By.ID, "numbers").text)
        assert shown["mean_rewards"] == cli_sample(capsys, 3, "0.55,0.5", 1.0, 0)
        art = os.environ.get("DBLEND_TEST_ARTIFACTS", str(tmp_path))
        os.makedirs(art, exist_ok=True)
        assert driver.save_screenshot(os.path.join(art, "ui.png"))
    finally:
        driver.quit()
