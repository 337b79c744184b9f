"""The gateway's upload page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): a person's path from a DICOM file to the probabilities and the heatmap on screen.

The page shows what the JSON API answers: the test classifies the same file through POST /v1/classify and holds
every bar's probability equal to it, checks that the heatmap image has loaded (decoded, non-zero size), that the
page says "not for clinical use", and that an unreadable file shows the gateway's own error message. It saves a
screenshot (tests' temp folder; also docs/upload-page.png when CXR_UPDATE_SCREENSHOT=1, for the README).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import requests

from conftest import ROOT, require

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1500",
]
WAIT_S = 120


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require(
        shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
        "Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "selenium (the dev extra) is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # a fresh profile every run: nothing cached, nothing shared with a person's browser
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path_factory.mktemp('chromium'))}")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _upload(browser, url: str, path: Path, expect: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
    )
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
    )
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == expect, browser.find_element(
        By.ID, "error"
    ).text


def test_upload_a_dicom_and_see_the_answer(browser, gateway_service, dicom_dir: Path, tmp_path: Path):
    from selenium.webdriver.common.by import By

    path = sorted(dicom_dir.rglob("*.dcm"))[0]
    url = f"http://127.0.0.1:{gateway_service.http_port}"
    expected = requests.post(
        f"{url}/v1/classify",
        params={"heatmap": "true"},
        data=path.read_bytes(),
        headers={"Content-Type": "application/dicom"},
        timeout=120,
    ).json()

    _upload(browser, url + "/", path, "done")
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    shown = {row.get_attribute("data-label"): float(row.get_attribute("data-probability")) for row in rows}
    assert shown == {c["label"]: pytest.approx(c["probability"], abs=1e-7) for c in expected["classes"]}
    assert len(shown) == len(expected["classes"]) >= 2
    for row in rows:  # the text a person reads says the same, to the shown precision
        probability = float(row.get_attribute("data-probability"))
        assert row.find_element(By.CLASS_NAME, "value").text == f"{100 * probability:.1f} %"
    assert browser.find_element(By.ID, "top-class").text == expected["topClass"]
    assert browser.find_element(By.ID, "model-name").text == expected["modelName"]
    assert browser.find_element(By.ID, "model-version").text == expected["modelVersion"]
    notices = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#notices li")]
    assert notices == expected["notices"]
    assert "not for clinical use" in browser.find_element(By.TAG_NAME, "body").text.lower()
    # the heatmap overlay is an image the browser has decoded, of the size the gateway rendered
    loaded = browser.execute_script(
        "const img = document.getElementById('heatmap-image');"
        "return [img.complete, img.naturalWidth, img.naturalHeight, !img.closest('figure').hidden];"
    )
    assert loaded[0] and loaded[1] > 0 and loaded[2] > 0 and loaded[3], loaded

    screenshot = tmp_path / "upload-page.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("CXR_UPDATE_SCREENSHOT") == "1":
        shutil.copy(screenshot, ROOT / "docs" / "upload-page.png")


def test_an_unreadable_file_shows_the_gateway_message(browser, gateway_service, tmp_path: Path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "truncated.png"  # a browser sends .png as image/png: the same request as below
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    url = f"http://127.0.0.1:{gateway_service.http_port}"
    expected = requests.post(
        f"{url}/v1/classify", data=bad.read_bytes(), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert expected.status_code == 400
    _upload(browser, url + "/", bad, "error")
    assert browser.find_element(By.ID, "error").text == expected.json()["message"]
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None


def test_the_page_loads_nothing_from_outside(gateway_service):
    """No CDN, no web font, no external script: a hospital network without internet serves the whole page."""
    static = ROOT / "services" / "gateway" / "static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text and "@import" not in text, path
    page = requests.get(f"http://127.0.0.1:{gateway_service.http_port}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Not for clinical use" in page.text


def test_every_control_is_reached_with_the_tab_key_in_order(browser, gateway_service):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(f"http://127.0.0.1:{gateway_service.http_port}/")
    reached = []
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.execute_script("return document.activeElement.id"))
    order = ["file", "model", "version", "heatmap", "token", "submit"]
    assert [r for r in reached if r in order][: len(order)] == order, reached
