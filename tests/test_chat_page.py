"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver)."""

import shutil

import numpy as np
import pytest

from nanogptoss_jax.data.tokenizer import CompactTokenizer, byte_base_ids
from tests.serving_helpers import serve, tiny_model

webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"),
                                reason="needs Debian's chromium and chromium-driver (.ci/run)")


def test_typing_a_message_streams_an_answer():
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  tokenizer = CompactTokenizer(np.concatenate([byte_base_ids(), [199999, 200002]]))
  # The page sends no seed, and a random model's first draw may be a stop id (an empty answer,
  # seen in CI): without stop ids the answer runs to the page's max_tokens.
  tokenizer.stop_ids = ()
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"):
    options.add_argument(flag)
  with serve(tiny_model(tokenizer.vocab_size), tokenizer, plain_text=True, slots=2) as (url, _):
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
      driver.get(url + "/")
      driver.find_element(By.ID, "input").send_keys("Once upon a time")
      driver.find_element(By.ID, "send").click()
      answer = WebDriverWait(driver, 120).until(
          lambda d: d.find_element(By.CSS_SELECTOR, ".assistant.done"))
      assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Once upon a time"
      assert answer.text.strip(), "no streamed text appeared"
    finally:
      driver.quit()
