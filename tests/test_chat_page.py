"""The chat page at GET / (runtime/server/static/chat.html) in a real browser: headless Chromium from apt
driven by Selenium, against the real server on SmolLM2. Its streamed answers must equal the API's greedy
answers for the same messages, it must send the whole conversation each turn, and Stop must cancel the
request on the server. Skipped, saying what is missing, where no browser is installed."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vkpack.runtime.engine import Engine
from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.runner import BackgroundServer

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    SELENIUM = ""
except ImportError as e:
    SELENIUM = f"selenium is not installed ({e}); pip install -e '.[test]'"

KEY = "sk-page"
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = SELENIUM or ("" if CHROMIUM and CHROMEDRIVER else
                          f"no browser: chromium {CHROMIUM or 'missing'}, chromedriver {CHROMEDRIVER or 'missing'} "
                          "(apt-get install chromium chromium-driver)")
needs_browser = pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER or "ok")
STEP = 0.03   # seconds each batch step sleeps in the streaming tests: a reply takes long enough to watch


# ---- without a browser: what is served and shipped ----


@pytest.fixture(scope="module")
def smol(smollm2_archive):
    """SmolLM2 served with an API key, as `vkpack serve --api-key` would."""
    # numpy: the page is under test, not the backend (and the native kernels slow down tenfold on a busy 2-core machine)
    engine = Engine(smollm2_archive, device="numpy")
    srv = BackgroundServer(create_app(engine, model_name="smol", api_key=KEY)).__enter__()
    srv.engine = engine
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield srv
    srv.__exit__()
    engine.close()


def test_page_is_open_self_contained_and_shipped(smol):
    r = httpx.get(smol.url + "/", timeout=10)   # no key: the page asks for it
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # nothing fetched from elsewhere: no absolute URL in any src, href, url() or fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|fetch\(\s*["'](https?:)?//""",
                         r.text), "the page must not load anything from another host"
    assert "v1/chat/completions" in r.text
    assert httpx.get(smol.url + "/v1/models", timeout=10).status_code == 401   # the API still needs the key
    # shipped as package data: the installed package holds it, and pyproject lists it
    page = importlib.resources.files("vkpack.runtime.server").joinpath("static", "chat.html")
    assert page.read_bytes() == r.content
    listed = re.search(r'^"vkpack\.runtime\.server" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert listed and re.search(r'"static/(chat|\*)\.html"', listed.group(1)), "pyproject's package-data must ship it"


# ---- in the browser ----


@pytest.fixture(scope="module")
def browser():
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(arg)
    # the apt chromedriver matches the apt chromium; naming it keeps Selenium from looking for one online
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _slow_steps(monkeypatch, engine, seconds: float = STEP) -> None:
    forward = engine.forward_batch

    def slow(seqs):
        time.sleep(seconds)
        return forward(seqs)

    monkeypatch.setattr(engine, "forward_batch", slow)


def _open(browser, smol, query: str) -> None:
    browser.get(f"{smol.url}/?{query}")
    browser.execute_script("localStorage.clear()")   # a fresh conversation and no stored key
    browser.get(f"{smol.url}/?{query}")
    # without a key the API answers 401: the page says so and opens its settings at the key field
    WebDriverWait(browser, 10).until(lambda d: "API key needed" in d.find_element(By.ID, "model").text)
    assert browser.find_element(By.ID, "settings-panel").get_attribute("open") is not None
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY, Keys.TAB)   # `change` stores it and reloads the model line
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text.startswith("smol"))


def _say(browser, text: str) -> tuple[str, list[str]]:
    """Type `text`, press Enter, and follow the reply as it streams: (final text, distinct partial texts seen)."""
    n_before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    browser.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)
    partial: list[str] = []
    deadline = time.monotonic() + 120
    while True:
        replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if len(replies) > n_before:
            reply = replies[-1]
            state = reply.get_attribute("data-state")
            shown = reply.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
            if state == "done":
                return shown, partial
            if shown and (not partial or partial[-1] != shown):
                partial.append(shown)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), \
            browser.find_element(By.CSS_SELECTOR, ".msg.error").text
        assert time.monotonic() < deadline, "no finished reply within 120 s"
        time.sleep(0.02)


@needs_browser
def test_page_streams_the_greedy_answer_and_keeps_the_conversation(browser, smol, monkeypatch):
    _slow_steps(monkeypatch, smol.engine)
    _open(browser, smol, "temperature=0&max_tokens=40")
    first = "What is the capital of France?"
    text, partial = _say(browser, first)
    msgs = [{"role": "user", "content": first}]
    api = smol.client.chat.completions.create(model="smol", messages=msgs, max_tokens=40, temperature=0)
    assert text == api.choices[0].message.content and "Paris" in text
    assert len(partial) >= 2 and all(text.startswith(p) and p != text for p in partial[:-1]), \
        f"the reply should appear piece by piece, saw {partial}"
    stats = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1].text
    m = re.fullmatch(r"(\d+) tokens? · first token (\d+) ms · ([\d.]+) tok/s", stats)
    assert m, stats
    assert int(m.group(1)) == api.usage.completion_tokens and float(m.group(3)) > 0
    assert float(m.group(3)) < 1.5 / STEP, "no faster than one token per (slowed) step"

    second = "And its population?"   # SmolLM2 answers it from the first turn, and differently alone
    text2, _ = _say(browser, second)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": second}]
    api2 = smol.client.chat.completions.create(model="smol", messages=msgs, max_tokens=40, temperature=0)
    assert text2 == api2.choices[0].message.content
    alone = smol.client.chat.completions.create(model="smol", messages=msgs[2:], max_tokens=40, temperature=0)
    assert api2.choices[0].message.content != alone.choices[0].message.content, \
        "this check needs an answer that depends on the earlier turns"
    # a reload keeps the conversation
    browser.refresh()
    shown = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg .text")]
    assert shown == [first, text, second, text2]


def _cancelled(smol) -> tuple[float, float]:
    r = httpx.get(smol.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    got = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    return got[("vkpack_finished_total", (("reason", "cancelled"),))], got[("vkpack_active_sequences", ())]


@needs_browser
def test_stop_cancels_the_request_on_the_server(browser, smol, monkeypatch):
    _slow_steps(monkeypatch, smol.engine)
    _open(browser, smol, "temperature=0&max_tokens=400")
    cancelled, _ = _cancelled(smol)
    browser.find_element(By.ID, "prompt").send_keys("Write a long story about a dragon who learns to bake.",
                                                    Keys.ENTER)
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
        and d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent"))
    assert _cancelled(smol)[1] == 1, "the reply should still be generating"
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state") == "stopped")
    deadline = time.monotonic() + 10
    while _cancelled(smol) != (cancelled + 1, 0):
        assert time.monotonic() < deadline, f"the server did not cancel: {_cancelled(smol)}"
        time.sleep(0.05)
    kept = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")
    stats = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1].text
    assert kept and int(stats.split()[0]) < 100, stats
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()


@needs_browser
def test_a_refused_request_shows_the_servers_error_and_gives_the_message_back(browser, smol):
    _open(browser, smol, "max_tokens=0")   # the server answers 400 naming the field
    browser.find_element(By.ID, "prompt").send_keys("Hello there", Keys.ENTER)
    err = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))[0]
    assert "max_tokens" in err.text, err.text
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello there"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.user, .msg.assistant")
    assert browser.execute_script("return localStorage.getItem('vkpack.chat.conversation')") == "[]"
