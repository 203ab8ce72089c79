"""A real headless Chromium for the tests that need a browser: find (or, as root, apt-install) chromium and
chromedriver, drive it with Selenium, wait for its downloads, take full-page screenshots.

Selenium Manager never runs: the chromedriver path is always passed through `Service`, so nothing is downloaded
from the internet. Nothing here skips a test; a missing browser raises, and the caller decides.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.portal.apt import ensure_installed

WINDOW_WIDTH, WINDOW_HEIGHT = 1400, 1800
MAX_SCREENSHOT_HEIGHT = 8000
PAGE_LOAD_TIMEOUT = 60
PACKAGES = ["chromium", "chromium-driver"]

_found: tuple[str, str] | None = None


def _find() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are on PATH or in /usr/bin, else None."""
    paths = [shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
             for name in ("chromium", "chromedriver")]
    return (paths[0], paths[1]) if all(paths) else None


def ensure_chromium() -> tuple[str, str]:
    """Return (chromium path, chromedriver path), installing both with apt when either is missing and we are root
    (tests/portal/apt.py); cached for the process."""
    global _found
    if _found is None:
        _found = ensure_installed(PACKAGES, _find)
    return _found


@contextlib.contextmanager
def browser(download_dir: Path) -> Iterator[webdriver.Chrome]:
    """A headless Chromium (window WINDOW_WIDTH x WINDOW_HEIGHT) whose downloads land in `download_dir` without
    asking; page loads time out after PAGE_LOAD_TIMEOUT seconds. The driver always quits at exit."""
    chromium, chromedriver = ensure_chromium()
    download_dir = Path(download_dir).resolve()
    download_dir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False,
                                              "download.directory_upgrade": True,
                                              "safebrowsing.enabled": False})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        # headless=new may ignore the prefs for downloads; the CDP command makes them land in download_dir
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                               "downloadPath": str(download_dir)})
        yield driver
    finally:
        driver.quit()


def wait_for_file(folder: Path, name: str, timeout: float = 60) -> Path:
    """Wait until `folder/name` exists and no `.crdownload` partial is left in `folder`; return its path.
    TimeoutError, listing what `folder` holds, after `timeout` seconds."""
    folder, deadline = Path(folder), time.monotonic() + timeout
    target = folder / name
    while True:
        if target.exists() and not any(folder.glob("*.crdownload")):
            return target
        if time.monotonic() > deadline:
            contents = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else None
            held = "it does not exist" if contents is None else f"it holds: {', '.join(contents) or 'nothing'}"
            raise TimeoutError(f"{name} did not finish downloading into {folder} within {timeout:g} s; {held}")
        time.sleep(0.1)


def screenshot(driver: webdriver.Chrome, path: Path) -> Path:
    """Save a PNG of the whole page (up to MAX_SCREENSHOT_HEIGHT px tall) at `path`: the window is made tall enough
    to show the document's scroll height for the shot, then given back its size. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    page = driver.execute_script(  # the body's height leaves out its margins: take the document's too
        "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    # the window is taller than the page area by its frame (about 140 px under --headless=new): add that back
    frame = size["height"] - driver.execute_script("return window.innerHeight")
    driver.set_window_size(size["width"], min(int(page), MAX_SCREENSHOT_HEIGHT) + max(int(frame), 0))
    try:
        if not driver.save_screenshot(str(path)):
            raise RuntimeError(f"could not write the screenshot to {path}")
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path
