"""The web pages in a real browser: Debian's chromium driven by selenium against a real `tileseg api` and
`tileseg worker` (embedded SQLite database and queue). Log in, submit a job through the form, watch it
finish, open an item and toggle the mask opacity. Screenshots go to test-artifacts/web/ (desktop and
phone sizes)."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port, start_process, stop_process, wait_http

pytestmark = pytest.mark.slow

SHOTS = REPO / "test-artifacts" / "web"
DESKTOP = (1280, 900)
PHONE = (390, 844)


def _find(name: str, default: str) -> str | None:
    return default if os.access(default, os.X_OK) else shutil.which(name)


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install -y --no-install-recommends chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER,
                                                            log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(tiny_models: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A running API and worker sharing the test's data dir; yields (base URL, alice's token)."""
    from core.db import session_scope, upgrade
    from core.tokens import create_token

    upgrade()  # before the processes start, so they never race to create the schema
    with session_scope() as s:
        _, token = create_token(s, "alice")
    env = {**os.environ, "TILESEG_PHOTO_BATCH": "2"}
    port = free_port()
    procs = [start_process(["api", "--port", str(port)], env, tmp_path / "api.log"),
             start_process(["worker", "--pool", "solo", "--loglevel", "WARNING"], env,
                           tmp_path / "worker.log")]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        yield base, token
    finally:
        for p in procs:
            stop_process(p)


def _wait(what: str, cond: Callable[[], Any], timeout: float = 30, logs: Path | None = None) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.25)
    extra = ""
    if logs is not None:
        extra = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                          for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out waiting for {what}{extra}")


def _shot(driver: Any, name: str, size: tuple[int, int]) -> Path:
    """A full-page screenshot (DevTools, beyond the viewport) with the window at ``size``."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(*size)
    page = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": page["width"], "height": min(page["height"], 8000), "scale": 1}})
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _images_loaded(driver: Any, selector: str) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


def _no_sideways_scroll(driver: Any) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_login_submit_watch_and_inspect(browser: Any, stack: tuple[str, str], photo_dir: Path,
                                        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    base, token = stack
    d = browser

    # Logged out: any page sends us to the login form, which brings us back afterwards.
    d.get(f"{base}/ui/submit")
    _wait("login page", lambda: "/ui/login" in d.current_url)
    _shot(d, "login-phone", PHONE)
    d.find_element(By.ID, "token").send_keys("tsk_wrong")
    d.find_element(By.ID, "login-submit").click()
    _wait("login error", lambda: "unknown or revoked" in d.page_source)
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "login-submit").click()
    _wait("submit page", lambda: d.current_url.endswith("/ui/submit"))
    cookie = d.get_cookie("tileseg_token")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert d.execute_script("return document.cookie") == ""  # invisible to scripts

    # Submit the photos by server-side path with an explicit pipeline.
    d.find_element(By.ID, "paths").send_keys(str(photo_dir))
    Select(d.find_element(By.ID, "pipeline-paths")).select_by_value("tiny-photo")
    _shot(d, "submit-desktop", DESKTOP)
    d.find_element(By.ID, "submit-paths").click()
    _wait("job page", lambda: "/ui/jobs/" in d.current_url)
    job_url = d.current_url
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1]
    _shot(d, "job-live-desktop", DESKTOP)  # queued or running, whichever the worker has reached

    # Live progress: the script updates the status in place, then reloads once to show the results.
    seen: set[str] = set()

    def finished() -> bool:
        try:
            seen.add(d.find_element(By.CSS_SELECTOR, "#job .badge").text)
            return bool(d.find_elements(By.ID, "metrics"))
        except Exception:  # noqa: BLE001 - the page is reloading under us
            return False

    _wait("the job to finish", finished, timeout=300, logs=tmp_path)
    status = d.find_element(By.CSS_SELECTOR, "#job .badge").text
    assert status == "succeeded", (status, seen)
    assert d.current_url == job_url  # followed without navigating away
    assert d.find_element(By.CSS_SELECTOR, "[data-field=items_done]").text == "3"
    assert len(d.find_elements(By.CSS_SELECTOR, "#metrics svg rect.value")) >= 2
    assert len(d.find_elements(By.CSS_SELECTOR, "#items li.item")) == 3
    _wait("thumbnails", lambda: _images_loaded(d, "#items .layers img"))
    assert len(d.find_elements(By.CSS_SELECTOR, "#items .layers img")) == 6  # source + mask per item
    _shot(d, "job-desktop", DESKTOP)
    _shot(d, "job-phone", PHONE)
    assert _no_sideways_scroll(d)
    d.set_window_size(*DESKTOP)

    # The job list shows it, and the status filter keeps it.
    d.get(f"{base}/ui/jobs?status=succeeded")
    assert job_id[:8] in d.find_element(By.CSS_SELECTOR, ".joblist").text
    _shot(d, "jobs-desktop", DESKTOP)
    _shot(d, "jobs-phone", PHONE)
    assert _no_sideways_scroll(d)
    d.set_window_size(*DESKTOP)

    # Open an item: the source preview with the mask stacked on top; slider and toggle change only the mask.
    d.get(job_url)
    d.find_element(By.CSS_SELECTOR, "#items li.item a.name").click()
    _wait("item page", lambda: "/items/" in d.current_url)
    _wait("item images", lambda: _images_loaded(d, ".viewer .layers img"))
    top = d.find_element(By.CSS_SELECTOR, ".viewer .layer-top")
    src = d.find_element(By.CSS_SELECTOR, ".viewer .layer-source")
    assert top.size == src.size  # the mask exactly covers the picture

    def opacity(el: Any) -> float:
        return float(d.execute_script("return getComputedStyle(arguments[0]).opacity", el))

    assert opacity(top) == pytest.approx(0.6)
    slider = d.find_element(By.ID, "opacity-item")
    slider.send_keys(Keys.END)
    assert opacity(top) == pytest.approx(1.0) and opacity(src) == pytest.approx(1.0)
    _shot(d, "item-mask-100-desktop", DESKTOP)
    toggle = d.find_element(By.CSS_SELECTOR, ".opacity-toggle")
    toggle.click()
    assert opacity(top) == 0.0 and toggle.text == "Show mask"
    _shot(d, "item-mask-hidden-desktop", DESKTOP)
    toggle.click()
    assert opacity(top) == pytest.approx(1.0)
    for _ in range(8):
        slider.send_keys(Keys.ARROW_LEFT)  # 5 % steps
    assert opacity(top) == pytest.approx(0.6)
    assert d.find_element(By.CSS_SELECTOR, ".opacity-value").text == "60 %"
    _shot(d, "item-desktop", DESKTOP)
    _shot(d, "item-phone", PHONE)
    assert _no_sideways_scroll(d)
    d.set_window_size(*DESKTOP)

    # The stored overlay opens as a picture.
    overlay_page = d.find_element(By.ID, "overlay-link").get_attribute("href")
    d.get(overlay_page)
    assert d.execute_script("return document.contentType") == "image/png"
    assert d.execute_script("return document.images[0].naturalWidth") == 256
    d.back()
    _wait("item page again", lambda: d.find_elements(By.CSS_SELECTOR, "#downloads a"))

    # Every artifact link downloads with the cookie alone; the stored overlay is a real PNG.
    links = [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert any(h.endswith("/artifacts/overlay") for h in links) and any(h.endswith("/artifacts/mask_png")
                                                                        for h in links)
    got = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(arguments[0].map(u => fetch(u, {credentials: 'same-origin'})"
        "  .then(async r => [r.status, r.headers.get('content-type'), new Uint8Array(await r.arrayBuffer())"
        "  .slice(0, 4).join(',')])))"
        ".then(done, e => done(String(e)));", links)
    assert all(status == 200 for status, _, _ in got), got
    overlay = got[[h.endswith("/artifacts/overlay") for h in links].index(True)]
    assert overlay[1] == "image/png" and overlay[2] == "137,80,78,71"  # \x89PNG

    # Sign out: the cookie is gone and pages ask for the token again.
    d.find_element(By.CSS_SELECTOR, "header form button").click()
    _wait("login page after sign out", lambda: "/ui/login" in d.current_url)
    assert d.get_cookie("tileseg_token") is None
    d.get(job_url)
    assert "/ui/login" in d.current_url
