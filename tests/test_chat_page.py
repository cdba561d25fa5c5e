"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver).

Screenshots are kept as artifacts: under pytest's tmp dir and in test-artifacts/ at the
repository root (ignored by git), chat_page.png (desktop) and chat_page_phone*.png (390 px).
"""

import pathlib
import shutil
import threading
import time

import numpy as np
import pytest

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.data.tokenizer import CompactTokenizer, FullTokenizer, byte_base_ids
from tests.serving_helpers import serve, tiny_model

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "test-artifacts"
PHONE_WIDTH = 390  # CSS pixels of a current iPhone
pytestmark = pytest.mark.skipif(not shutil.which("chromium"),
                                reason="needs Debian's chromium and chromium-driver (.ci/run)")


@pytest.fixture(scope="module")
def browser():
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--window-size=1280,860"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def open_page(driver, url):
  """Loads the page with default settings (they persist per origin, and ports get reused)."""
  driver.get(url + "/")
  driver.execute_script("localStorage.clear()")
  driver.refresh()


def keep_screenshot(driver, tmp_path, name):
  """Writes the screenshot under pytest's tmp dir and test-artifacts/."""
  png = driver.get_screenshot_as_png()
  ARTIFACTS.mkdir(exist_ok=True)
  for directory in (tmp_path, ARTIFACTS):
    (directory / name).write_bytes(png)


def text_of(driver, css):
  """The element's textContent (Selenium's .text would fold whitespace)."""
  return driver.execute_script("return document.querySelector(arguments[0]).textContent", css)


def shown(driver, css):
  return driver.find_element(By.CSS_SELECTOR, css).is_displayed()


def fill(driver, values):
  """Types each settings field's value (number inputs by id)."""
  for field, value in values.items():
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(str(value))


def wait_until(condition, seconds=60, what="condition"):
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def record_requests(engine, monkeypatch):
  """Every engine Request the server submits, with the ids it was handed and how it ended."""
  submitted = []
  real_submit = engine.submit

  def submit(request):
    request.delivered, request.reasons = [], []
    on_tokens, on_done = request.on_tokens, request.on_done
    request.on_tokens = lambda t: (request.delivered.extend(t), on_tokens(t))
    request.on_done = lambda why: (request.reasons.append(why), on_done(why))
    submitted.append(request)
    real_submit(request)

  monkeypatch.setattr(engine, "submit", submit)
  return submitted


def test_plain_text_page_streams_stops_and_frees_the_slot(browser, monkeypatch):
  tokenizer = CompactTokenizer(np.concatenate([byte_base_ids(), [199999, 200002]]))
  # A random model's draw may be a stop id at any step: without stop ids only max tokens or Stop
  # end an answer, so the stream is still running when the test presses Stop.
  tokenizer.stop_ids = ()
  model = tiny_model(tokenizer.vocab_size)
  with serve(model, tokenizer, plain_text=True, slots=1) as (url, engine):
    submitted = record_requests(engine, monkeypatch)
    step = engine._step
    # A tiny model decodes 400 tokens in well under a second; paced, the answer takes >= 10 s.
    monkeypatch.setattr(engine, "_step", lambda: (step(), time.sleep(0.1)))
    open_page(browser, url)
    WebDriverWait(browser, 30).until(lambda d: text_of(d, "#mode") == "plain text")
    assert text_of(browser, "#model-name") == "tiny"
    assert not shown(browser, "#effort") and not shown(browser, "#system")  # harmony only

    fill(browser, {"temperature": 0.7, "top-p": 0.9, "max-tokens": 400, "seed": 5})
    browser.find_element(By.ID, "input").send_keys("Once upon a time", Keys.ENTER)
    WebDriverWait(browser, 60).until(lambda d: text_of(d, ".assistant .answer"))
    assert shown(browser, "#stop") and not shown(browser, "#send")
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.done"))

    (request,) = submitted
    # The aborted fetch is the only signal the server gets: the engine must end the request.
    wait_until(lambda: engine.busy_slots() == 0, 3, "the slot to be freed after Stop")
    assert request.reasons == ["cancelled"] and len(request.delivered) < 400
    assert (request.temperature, request.top_p, request.max_tokens, request.seed) == (
        pytest.approx(0.7), pytest.approx(0.9), 400, 5)
    assert request.prompt == tokenizer.encode("Once upon a time")
    shown_text = text_of(browser, ".assistant .answer")
    assert shown_text and tokenizer.decode(request.delivered).startswith(shown_text)
    assert "stopped" in text_of(browser, ".assistant .meta")
    assert shown(browser, "#send") and not shown(browser, "#stop")

    # The freed slot serves the next message; plain text sends only the latest one.
    fill(browser, {"max-tokens": 8})
    browser.find_element(By.ID, "input").send_keys("The end")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) == 2)
    assert submitted[1].prompt == tokenizer.encode("The end")
    assert submitted[1].reasons == ["length"] and len(submitted[1].delivered) == 8
    meta = browser.find_elements(By.CSS_SELECTOR, ".assistant .meta")[1]
    assert "reached max tokens" in meta.text


def script_answers(engine, monkeypatch, ids):
  """The engine answers every request with `ids` (up to a stop id), two at a time, without
  running the model: a random model never writes harmony's channels. Returns the requests."""
  submitted = []

  def answer(request):
    script = ids[:next((i for i, t in enumerate(ids) if t in request.stop_ids), None)]
    for start in range(0, len(script), 2):
      if request.cancelled:
        return request.on_done("cancelled")
      request.on_tokens(script[start:start + 2])
      time.sleep(0.01)
    request.on_done("stop")

  def submit(request):
    submitted.append(request)
    threading.Thread(target=answer, args=(request,), daemon=True).start()

  monkeypatch.setattr(engine, "submit", submit)
  return submitted


@pytest.fixture(scope="module")
def full_tokenizer():
  return FullTokenizer()


@pytest.fixture(scope="module")
def full_vocab_model(full_tokenizer):
  return tiny_model(full_tokenizer.vocab_size)


ANALYSIS = "The user greets me. A short, friendly reply fits."
FINAL = "Hello! I am a tiny GPT-OSS. What would you like to talk about?"


def test_harmony_page_folds_reasoning_keeps_the_conversation_fits_a_phone(
    browser, full_tokenizer, full_vocab_model, monkeypatch, tmp_path):
  tokenizer = full_tokenizer
  answer = tokenizer.encoding.encode(  # what a harmony model writes after <|start|>assistant
      f"<|channel|>analysis<|message|>{ANALYSIS}<|end|>"
      f"<|start|>assistant<|channel|>final<|message|>{FINAL}<|return|>", allowed_special="all")
  with serve(full_vocab_model, tokenizer, slots=1) as (url, engine):
    submitted = script_answers(engine, monkeypatch, answer)
    browser.set_window_size(1280, 860)
    open_page(browser, url)
    WebDriverWait(browser, 30).until(lambda d: text_of(d, "#mode") == "harmony")
    assert text_of(browser, "#model-name") == "tiny"
    fill(browser, {"temperature": 0.3, "top-p": 0.8, "max-tokens": 100, "seed": 7})
    Select(browser.find_element(By.ID, "effort")).select_by_visible_text("high")
    browser.find_element(By.ID, "system").send_keys("Answer briefly.")

    def ask(text, turns):
      browser.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
      WebDriverWait(browser, 30).until(
          lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) == turns)

    ask("Hello there", 1)
    request = submitted[0]
    system = {"role": "system", "content": "Answer briefly."}
    assert request.prompt == harmony.render_chat(
        [system, {"role": "user", "content": "Hello there"}], reasoning_effort="high",
        tokenizer=tokenizer)
    assert (request.temperature, request.top_p, request.max_tokens, request.seed) == (
        pytest.approx(0.3), pytest.approx(0.8), 100, 7)
    assert text_of(browser, ".assistant .answer") == FINAL
    # The analysis channel is there but folded until asked for.
    details = browser.find_element(By.CSS_SELECTOR, ".assistant details.analysis")
    assert details.get_attribute("open") is None and text_of(browser, ".reasoning") == ANALYSIS
    assert not browser.find_element(By.CSS_SELECTOR, ".reasoning").is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()
    assert browser.find_element(By.CSS_SELECTOR, ".reasoning").is_displayed()

    # The next turn carries the conversation: the earlier answer's final text, not its analysis.
    ask("Tell me a story about a robot.", 2)
    assert submitted[1].prompt == harmony.render_chat(
        [system, {"role": "user", "content": "Hello there"},
         {"role": "assistant", "content": FINAL},
         {"role": "user", "content": "Tell me a story about a robot."}],
        reasoning_effort="high", tokenizer=tokenizer)
    keep_screenshot(browser, tmp_path, "chat_page.png")

    # Phone width: nothing wider than the screen, the composer and buttons on it.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": PHONE_WIDTH, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
      assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE_WIDTH
      for css in ("#send", "#new-chat", "#settings-toggle", "#input"):
        box = browser.find_element(By.CSS_SELECTOR, css).rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE_WIDTH, (css, box)
      assert not shown(browser, "#settings")  # folded behind its button on a phone
      keep_screenshot(browser, tmp_path, "chat_page_phone.png")
      browser.find_element(By.ID, "settings-toggle").click()
      assert shown(browser, "#temperature") and shown(browser, "#effort")
      keep_screenshot(browser, tmp_path, "chat_page_phone_settings.png")
      browser.find_element(By.ID, "settings-toggle").click()
    finally:
      browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # New chat forgets the conversation: the next prompt holds only the new message.
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
    ask("A fresh start", 1)
    assert submitted[2].prompt == harmony.render_chat(
        [system, {"role": "user", "content": "A fresh start"}], reasoning_effort="high",
        tokenizer=tokenizer)


def test_api_key_and_a_refused_setting_are_explained_on_the_page(
    browser, full_tokenizer, full_vocab_model, monkeypatch):
  tokenizer = full_tokenizer
  answer = tokenizer.encoding.encode(f"<|channel|>final<|message|>{FINAL}<|return|>",
                                     allowed_special="all")
  with serve(full_vocab_model, tokenizer, api_key="sesame", slots=1) as (url, engine):
    submitted = script_answers(engine, monkeypatch, answer)
    open_page(browser, url)
    WebDriverWait(browser, 30).until(lambda d: text_of(d, "#mode") == "API key needed")
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()
    key.send_keys("sesame", Keys.TAB)  # the change event reloads the model's card
    WebDriverWait(browser, 30).until(lambda d: text_of(d, "#mode") == "harmony")

    # A value the server refuses: its one-line reason in the turn, the text back in the box.
    fill(browser, {"temperature": 5})
    browser.find_element(By.ID, "input").send_keys("Hello there", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.error"))
    assert text_of(browser, ".assistant .answer") == (
        "Error: temperature must be a number in [0, 2], got 5")
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello there"
    assert not submitted

    fill(browser, {"temperature": 1})
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.done:not(.error)"))
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant .answer")[-1].text == FINAL
    # The failed question left the history: the prompt holds the question once.
    assert submitted[0].prompt == harmony.render_chat(
        [{"role": "user", "content": "Hello there"}], tokenizer=tokenizer)
