"""Headless Chromium for the report's tests and bench/report.py: Debian's `chromium` driven by selenium
through Debian's `chromium-driver` (both installed by .ci/run; nothing is downloaded)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
# Headless as root on a machine with no network: no sandbox (root), no GPU, and nothing that phones home
# (without the background-networking flags it keeps trying to connect).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


@contextlib.contextmanager
def chromium():
    """A selenium WebDriver on a fresh profile; its console (errors included) is read by `console_errors`."""
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        raise RuntimeError(f"{CHROMIUM} and {DRIVER} are needed: apt-get install chromium chromium-driver "
                           "(.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sdxlpipe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """Console errors and uncaught exceptions since the last call (the log is drained)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(driver, script: str, timeout: float = 20.0):
    """Poll a JS expression until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def paint_timing(driver) -> dict:
    """first-paint / first-contentful-paint of the current page, in ms from navigation start."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
    return {name: ms for name, ms in entries}


def loaded_before(driver, ms: float) -> list[str]:
    """URLs of the resources whose loading ended before `ms` (the document itself not included)."""
    return json.loads(driver.execute_script(
        "return JSON.stringify(performance.getEntriesByType('resource')"
        ".filter(e => e.responseEnd <= arguments[0]).map(e => e.name))", ms))


def screenshot(driver, path) -> None:
    """The whole page, not just the window: the window is made as tall as the page for the shot."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(full, 600), 8000))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)
