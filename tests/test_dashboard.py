"""The dashboard at /ui in a real headless browser (Debian's chromium and chromedriver) against a
live coordinator and device processes: sign-in, runs, a live run, a revoke, a device's view.
Screenshots of the main views land in the test's tmp dir, and also in the folder that the
COTUNE_SCREENSHOTS environment variable names (CI keeps them as artifacts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cotune.demo.quickstart import child_env
from tests.support import CoordinatorProcess, join_cmd, run_spec

CHROMIUM = os.environ.get("COTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("COTUNE_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("selenium", reason="the dashboard test drives a browser with selenium (the dev extra)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until `check` gives something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the page is mid-render: an element was just replaced
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    extra = os.environ.get("COTUNE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def count(driver: Any, css: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, css))


def sign_in(driver: Any, url: str, token: str, run_id: str = "") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/")
    driver.execute_script("sessionStorage.clear()")  # a fresh sign-in, whoever was signed in before
    driver.refresh()
    wait_for("the sign-in form", lambda: driver.find_element(By.ID, "signin-view").is_displayed())
    driver.find_element(By.ID, "signin-token").send_keys(token)
    driver.find_element(By.ID, "signin-run").send_keys(run_id)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()


def enroll(url: str, enroll_token: str, name: str) -> dict[str, str]:
    response = httpx.post(f"{url}/v1/clients", headers={"Authorization": f"Bearer {enroll_token}"},
                          json={"name": name, "profile": {"arch": "x86_64", "cores": 2}}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def test_dashboard_files_are_served_with_a_strict_policy(tmp_path) -> None:
    """The page and its assets come from the coordinator itself, never from elsewhere."""
    coord = CoordinatorProcess(tmp_path / "coord").start()
    try:
        page = httpx.get(f"{coord.url}/ui", follow_redirects=True, timeout=10)
        assert page.status_code == 200 and "app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", ""), "the page loads nothing from another origin"
        for name in ("app.js", "style.css"):
            asset = httpx.get(f"{coord.url}/ui/{name}", timeout=10)
            assert asset.status_code == 200 and len(asset.content) > 100
        # Only the page's own files: a name from the URL is never a path on disk.
        for probe in ("../app.py", "..%2Fapp.py", "%2e%2e/settings.py", "secret.txt"):
            response = httpx.get(f"{coord.url}/ui/{probe}", timeout=10)
            assert response.status_code == 404, probe
            assert "secret" not in response.text and "settings" not in response.text
    finally:
        coord.stop()


def test_dashboard_follows_a_live_run(world, tmp_path, browser) -> None:
    from selenium.webdriver.common.by import By

    spec = run_spec(world, name="watched", rounds=2, builds=["gguf:f32"])
    coord = CoordinatorProcess(tmp_path / "coord", run=spec).start()
    devices: list[subprocess.Popen] = []
    try:
        run_a = coord.run_id()
        spare = enroll(coord.url, spec["enroll_token"], "spare-device")

        # The admin signs in; the token never appears in the address bar.
        sign_in(browser, coord.url, coord.admin_token)
        wait_for("the runs table", lambda: "watched" in text(browser, "#runs-table tbody"))
        assert coord.admin_token not in browser.current_url
        assert browser.execute_script("return sessionStorage.getItem('cotune.token')") == coord.admin_token

        # Create a second run from the form (JSON).
        other = run_spec(world, name="other", rounds=1)
        browser.find_element(By.CSS_SELECTOR, "#create-panel summary").click()
        browser.find_element(By.ID, "create-spec").send_keys(json.dumps(other))
        browser.find_element(By.CSS_SELECTOR, "#create-form button").click()
        wait_for("the created run", lambda: "created" in text(browser, "#create-result"), timeout=120)
        wait_for("two runs listed", lambda: count(browser, "#runs-table tbody tr[data-run]") == 2)
        # Bad JSON is refused in the page, with what to do.
        browser.find_element(By.ID, "create-spec").clear()
        browser.find_element(By.ID, "create-spec").send_keys("name = 'toml'")
        browser.find_element(By.CSS_SELECTOR, "#create-form button").click()
        wait_for("the JSON error", lambda: "Not JSON" in text(browser, "#create-result"))
        screenshot(browser, tmp_path, "runs")

        # The run view; the admin revokes the spare device before the real ones join.
        browser.find_element(By.LINK_TEXT, "watched").click()
        wait_for("the run view", lambda: text(browser, "#run-title") == "watched")
        row = f"#devices-table tr[data-client='{spare['client_id']}']"
        wait_for("the spare device's row", lambda: count(browser, row) == 1)
        browser.find_element(By.CSS_SELECTOR, f"{row} button.revoke").click()
        browser.switch_to.alert.accept()
        wait_for("the row to show revoked", lambda: "revoked" in text(browser, f"{row} td.status"))
        refused = httpx.get(f"{coord.url}/v1/runs/{run_a}/rounds/current",
                            headers={"Authorization": f"Bearer {spare['token']}"}, timeout=10)
        assert refused.status_code == 403 and "revoked" in refused.json()["detail"]["message"], refused.text

        for k in range(2):
            log = (tmp_path / f"device-{k}.log").open("w")
            devices.append(subprocess.Popen(join_cmd(coord, world, k, tmp_path / f"device-{k}"),
                                            stdout=log, stderr=subprocess.STDOUT, env=child_env()))
        # The page updates itself (no reload): watch the round counter advance to the end.
        seen: list[str] = []

        def finished() -> bool:
            progress = text(browser, "#run-progress")
            if not seen or seen[-1] != progress:
                seen.append(progress)
            for k, proc in enumerate(devices):
                if proc.poll() not in (None, 0):
                    raise RuntimeError(f"device {k} failed:\n{(tmp_path / f'device-{k}.log').read_text()[-2000:]}")
            return "finished" in text(browser, "#run-summary")

        try:
            wait_for("the run to finish on the page", finished, timeout=420)
        except AssertionError:
            raise AssertionError(f"page saw {seen}; coordinator log:\n{coord.log_tail()}") from None
        rounds_seen = [int(re.search(r"(\d+) / 2", s).group(1)) for s in seen]
        assert rounds_seen == sorted(rounds_seen) and rounds_seen[-1] == 2 and len(set(rounds_seen)) >= 2, seen
        assert count(browser, "#timeline-table tr[data-round]") == 2
        assert text(browser, "#timeline-table tr[data-round='2']").count("closed") >= 2  # state and timeline
        # Charts: SLM and LLM Rouge-L for the starting scores and both rounds, bytes per round.
        wait_for("chart points", lambda: count(browser, "#chart-rouge circle.pt[data-series='SLM']") == 3)
        assert count(browser, "#chart-rouge circle.pt[data-series='LLM']") == 3
        assert count(browser, "#chart-em circle.pt") == 6
        assert count(browser, "#chart-bytes circle.pt") == 4
        assert count(browser, "#bytes-table tbody tr") == 4  # two devices, two rounds
        assert "local differential privacy is off" in text(browser, "#chart-epsilon")
        wait_for("the final build", lambda: count(browser, "#builds-table tbody tr") == 1, timeout=120)
        screenshot(browser, tmp_path, "run")
        # The admin publishes one more build from the page; it is listed with its size.
        browser.find_element(By.ID, "publish-targets").clear()
        browser.find_element(By.ID, "publish-targets").send_keys("gguf:f16")
        browser.find_element(By.CSS_SELECTOR, "#publish-form button").click()
        wait_for("the published build", lambda: "Published" in text(browser, "#publish-result"), timeout=180)
        wait_for("two builds listed", lambda: count(browser, "#builds-table tbody tr") == 2)
        builds = text(browser, "#builds-table")
        assert "f16" in builds and re.search(r"\d (KiB|MiB)", builds) and "top1_agreement" in builds, builds
        screenshot(browser, tmp_path, "builds")

        # A device of the other run sees its run, read-only, and not this one.
        run_b = next(r["run_id"] for r in httpx.get(f"{coord.url}/v1/runs", headers=coord.admin, timeout=10).json()
                     if r["name"] == "other")
        device_b = enroll(coord.url, other["enroll_token"], "device-of-other")
        sign_in(browser, coord.url, device_b["token"], run_a)  # naming a run not its own
        wait_for("the refusal at sign-in", lambda: "may not read that run" in text(browser, "#flash"))
        assert browser.execute_script("return sessionStorage.getItem('cotune.token')") is None
        sign_in(browser, coord.url, device_b["token"], run_b)
        wait_for("the device's run", lambda: text(browser, "#run-title") == "other")
        assert "read-only" in text(browser, "#who")
        assert not browser.find_element(By.ID, "publish-form").is_displayed()
        assert "for the admin" in text(browser, "#devices")
        screenshot(browser, tmp_path, "device-view")
        browser.get(f"{coord.url}/ui/#/runs/{run_a}")
        wait_for("the refusal", lambda: "may not read it" in text(browser, "#run-denied"))
        assert "watched" not in browser.find_element(By.TAG_NAME, "main").text
        browser.get(f"{coord.url}/ui/#/")  # a device has no runs list: back to its own run
        wait_for("the device's own run again", lambda: text(browser, "#run-title") == "other")
    finally:
        for proc in devices:
            if proc.poll() is None:
                proc.kill()
        coord.stop()
