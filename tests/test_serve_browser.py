"""The page at / in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
choose a picture, ask, read the streamed answer from the DOM.

NANOVLM_SERVE_BUNDLE=DIR runs it on another bundle (e.g. the demo's trained one) and
NANOVLM_SCREENSHOT=FILE.png keeps the screenshot (docs/serve_page.png comes from such a run).
"""

import os
import shutil

import pytest
from PIL import Image

from core.shapes_dataset import ShapesDataset
from runtime.pipeline import VLMPipeline
from serve.process import ServerProcess as Server
from tests.conftest import export_lively

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; CI installs them)",
)


def _browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_page_streams_an_answer_about_a_picture(tiny_tokenizer_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = (
        os.environ.get("NANOVLM_SERVE_BUNDLE") or export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    )
    sample = ShapesDataset("test")[0]  # a built-in scene and question (the demo model's domain)
    picture = tmp_path / "scene.png"
    sample.image.save(picture)
    question = sample.question
    expected = VLMPipeline.from_bundle(bundle).generate(str(picture), question, max_new_tokens=128)
    with Server(bundle) as server:
        driver = _browser()
        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text != "…")
            driver.find_element(By.ID, "image").send_keys(str(picture))
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 60).until(
                lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed"))
            )
            answer = driver.find_element(By.ID, "answer").get_attribute("textContent")
            status = driver.find_element(By.ID, "status").text
            shot = os.environ.get("NANOVLM_SCREENSHOT") or str(tmp_path / "page.png")
            assert driver.save_screenshot(shot)
        finally:
            driver.quit()
    assert status.startswith("done"), (status, answer)
    assert answer == expected and expected.strip()
    assert Image.open(shot).size[0] > 0
