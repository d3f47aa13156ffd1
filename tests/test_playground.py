"""The playground page in a real headless browser (Debian chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_observability import MEDICAL, TWO_DOMAIN, serve_graph, small_graph_args

pytestmark = pytest.mark.serve

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"  # gitignored; CI can keep it
API_KEY = "playground-key-123"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def served(zoo: Path) -> Iterator[str]:
    args = small_graph_args(zoo)
    args["server"]["api_key"] = API_KEY  # the page must work with auth on
    with serve_graph(args) as (url, _metrics_port, _logs):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them when run as root)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_is_served_at_root(served: str) -> None:
    r = httpx.get(f"{served}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "http://" not in r.text.split("<script>")[1]  # no CDN, nothing external


def test_chat_streams_and_shows_routing(served: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(f"{served}/")
    # Without the key the model list is refused; with it the picker fills with auto + every specialist.
    wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1)
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == ["auto", "medical", "code"]
    assert browser.execute_script("return sessionStorage.getItem('consilium.apiKey')") == API_KEY
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("24")

    # Record every length the answer text takes while it streams in.
    browser.execute_script(
        """
        window.seenLengths = [];
        new MutationObserver(() => {
          const t = document.querySelectorAll('.msg.assistant .text');
          if (t.length) window.seenLengths.push(t[t.length - 1].textContent.length);
        }).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
        """
    )
    browser.find_element(By.ID, "prompt").send_keys(TWO_DOMAIN)
    browser.find_element(By.ID, "send").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant .routing")))
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    seen = [n for n in browser.execute_script("return window.seenLengths") if n > 0]
    assert len(set(seen)) >= 2, f"the answer did not grow chunk by chunk: {seen}"
    text = answer.find_element(By.CSS_SELECTOR, ".text").text
    assert text and "error" not in answer.get_attribute("class")
    # Scores as bars, one per domain, and the two chosen specialists merged, each answer beside the synthesis.
    domains = {e.get_attribute("data-domain") for e in answer.find_elements(By.CSS_SELECTOR, ".score")}
    assert domains == {"medical", "code", "general"}
    chips = [e.text for e in answer.find_elements(By.CSS_SELECTOR, ".chips span")]
    assert {"used: medical", "used: code", "merged"} <= set(chips)
    columns = [e.text.split("\n")[0] for e in answer.find_elements(By.CSS_SELECTOR, ".answers > div")]
    assert columns == ["medical", "code", "synthesis"] or columns == ["code", "medical", "synthesis"]
    assert "fan_out" in answer.find_element(By.CSS_SELECTOR, "table.timings").text

    # Pin a specialist: only it answers, and the panel says so.
    Select(browser.find_element(By.ID, "model")).select_by_value("code")
    browser.find_element(By.ID, "prompt").send_keys(MEDICAL)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .routing")) == 2)
    pinned = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    chips = [e.text for e in pinned.find_elements(By.CSS_SELECTOR, ".chips span")]
    assert "pinned" in chips and "used: code" in chips and "used: medical" not in chips
    assert "assistant · code" in pinned.find_element(By.CSS_SELECTOR, ".who").text

    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    for path in (tmp_path / "playground.png", ARTIFACTS / "playground.png"):
        assert browser.save_screenshot(str(path))
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
