"""The portal as a real participant sees it, in one headless Chromium session: sign in, read the challenge page
(HTML in the organisers' title and description shows as text, no script runs), download a shard and check it
against the API's SHA-256, upload an encoder through the form (its JavaScript progress bar and redirect), let a
real worker score it, and find it on the leaderboard. Its screenshots go to the test's temporary folder, or, with
RAF_DOCS_SCREENSHOTS=1 in the environment, to docs/images (the ones the README shows)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.portal import conftest
from tests.portal.browser import browser, ensure_chromium, screenshot, wait_for_file

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
ENTRY = "browser <b>upload</b>"
DESCRIPTION_SCRIPT = "<script>alert('x')</script>"
NUMBER = r"-?\d+(?:\.\d+)?"
MIN_PNG_BYTES = 10 * 1024


def value_and_interval(value: str, interval: str) -> tuple[float, float, float]:
    """(value, low, high) from a cell "0.123" and an interval "[0.100, 0.150]", checking low <= value <= high."""
    match = re.fullmatch(rf"\[({NUMBER}), ({NUMBER})\]", interval.strip())
    assert match, f"not an interval: {interval!r}"
    number = float(re.fullmatch(NUMBER, value.strip()).group(0))
    low, high = float(match.group(1)), float(match.group(2))
    assert low <= number <= high, (number, low, high)
    return number, low, high


def check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > MIN_PNG_BYTES, (path, path.stat().st_size)


def test_participant_journey_in_a_real_browser(site, tmp_path):
    ensure_chromium()
    images = DOCS_IMAGES if os.environ.get("RAF_DOCS_SCREENSHOTS") == "1" else tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    downloads = tmp_path / "downloads"
    weights = site.encoders["random2"].resolve()
    card = weights.with_name("encoder.card.json")
    with site.client() as api:
        listed = {(d["split"], d["name"]): d["sha256"] for d in api.get("/api/challenges/synth-raf").json()["downloads"]}

    with browser(downloads) as driver:
        wait = WebDriverWait(driver, 120)

        # 1. sign in through the form
        driver.get(f"{site.url}/login")
        driver.find_element(By.ID, "name").send_keys("alice")
        driver.find_element(By.ID, "password").send_keys(conftest.PASSWORD)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(EC.url_to_be(f"{site.url}/me"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "alice"

        # 2. the challenge page: the organisers' HTML is text, their script never runs
        driver.get(f"{site.url}/challenges/synth-raf")
        wait.until(EC.presence_of_element_located((By.ID, "challenge-title")))
        assert driver.find_element(By.ID, "challenge-title").text == "Synthetic <b>body</b> challenge"
        assert DESCRIPTION_SCRIPT in driver.find_element(By.CLASS_NAME, "description").text
        assert not driver.find_elements(By.CSS_SELECTOR, "#challenge-title b, .description script")
        assert EC.alert_is_present()(driver) is False
        screenshot(driver, images / "portal-challenge.png")

        # 3. download the first train shard; its bytes match the checksum the API lists
        link = next(a for a in driver.find_elements(By.CSS_SELECTOR, "a.download") if a.text.endswith(".tar"))
        name = link.text
        assert "/downloads/train/" in link.get_attribute("href"), link.get_attribute("href")
        link.click()
        shard = wait_for_file(downloads, name, timeout=120)
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == listed[("train", name)]

        # 4. upload an encoder through the form; upload.js posts it and follows the redirect
        Select(driver.find_element(By.ID, "phase")).select_by_value("sanity")  # the final board is private
        driver.find_element(By.ID, "submission-name").send_keys(ENTRY)
        driver.find_element(By.ID, "weights").send_keys(str(weights))
        driver.find_element(By.ID, "card").send_keys(str(card))
        driver.find_element(By.ID, "upload").click()
        wait.until(EC.url_contains("/submissions/"))
        submission_url = driver.current_url
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "queued"))
        assert driver.find_element(By.TAG_NAME, "h1").text == ENTRY

        # 5. a real worker scores it; the page shows the RAF index inside its interval
        worker = conftest.run_worker(site.root)
        assert worker.returncode == 0, worker.stderr
        driver.get(submission_url)
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "scored"))
        raf_row = driver.find_element(By.XPATH, "//table[@id='score']//tr[td[1]='RAF index']")
        _, value, ci = (cell.text for cell in raf_row.find_elements(By.TAG_NAME, "td"))
        raf, low, high = value_and_interval(value, ci)
        report_url = driver.find_element(By.ID, "report").get_attribute("href")

        # 6. the leaderboard shows the entry (its name as text) with the same RAF and interval
        # (other tests share the site: when alice already has a better sanity entry, the best-per-participant
        # board shows that one, and ours is on the board of every entry)
        for query in ("phase=sanity", "phase=sanity&all=1"):
            driver.get(f"{site.url}/challenges/synth-raf/leaderboard?{query}")
            wait.until(EC.presence_of_element_located((By.ID, "leaderboard")))
            rows = [row for row in driver.find_elements(By.CSS_SELECTOR, "#leaderboard tr")
                    if [cell.text for cell in row.find_elements(By.TAG_NAME, "td")][2:4] == ["alice", ENTRY]]
            if rows:
                break
        assert len(rows) == 1, driver.find_element(By.ID, "leaderboard").text
        board_cell = rows[0].find_elements(By.CSS_SELECTOR, "td.value")[0]   # RAF is the first value column
        board_value = board_cell.text.split(" ", 1)[0]
        board_ci = board_cell.find_element(By.CLASS_NAME, "ci").text
        assert value_and_interval(board_value, board_ci) == (raf, low, high)
        screenshot(driver, images / "portal-leaderboard.png")

        # 7. the evaluation report
        driver.get(report_url)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert driver.current_url.endswith("/report")
        assert "robustness and fairness report" in driver.find_element(By.TAG_NAME, "h1").text
        screenshot(driver, images / "portal-report.png")
        assert EC.alert_is_present()(driver) is False

    for shot in ("portal-challenge.png", "portal-leaderboard.png", "portal-report.png"):
        check_png(images / shot)
