"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Skipped when the browser, its driver or selenium is absent: nothing is downloaded at test
time. The screenshot is kept in test-artifacts/serve_page.png.
"""

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("open_clip")
selenium = pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def base_url():
    import uvicorn

    from medvl.serve.app import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app("medvl-vqarad-small", "medclip-r10t-minilm"), host="127.0.0.1",
                                           port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def test_page_upload_dicom_ask_and_zero_shot(base_url, browser):
    from pydicom.data import get_testdata_file
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(base_url + "/")
    wait.until(lambda d: "medvl-vqarad-small" in d.find_element(By.ID, "models").text)
    browser.find_element(By.ID, "file").send_keys(get_testdata_file("CT_small.dcm"))
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    first = browser.find_element(By.ID, "preview").get_attribute("src")
    Select(browser.find_element(By.ID, "window")).select_by_visible_text("bone")
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src") != first)  # the preset re-renders
    q = browser.find_element(By.ID, "question")
    q.send_keys("Which organ is shown?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
    assert browser.find_element(By.ID, "error").text == ""
    labels = browser.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("chest, head, abdomen")
    browser.find_element(By.ID, "classify").click()
    wait.until(EC.presence_of_all_elements_located((By.CSS_SELECTOR, "#bars .bar")))
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 3
    pcts = [float(b.text.split()[-1].rstrip("%")) for b in bars]
    assert abs(sum(pcts) - 100) < 0.5 and pcts == sorted(pcts, reverse=True)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000


def test_page_shows_a_clear_error_for_a_corrupt_file(base_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    browser.get(base_url + "/")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text != "")
    assert "image" in browser.find_element(By.ID, "error").text
