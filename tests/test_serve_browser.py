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


def test_camera_mode_answers_the_newest_frame_beside_the_live_picture(tiny_tokenizer_dir, tmp_path):
    """Headless chromium with a fake camera fed from a file of a still scene: camera mode sends frame
    after frame as answers come back; each answer streams beside the live picture with its latency,
    and from the second frame on every view comes from the server's cache."""
    pytest.importorskip("av")
    import re

    import numpy as np
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = (
        os.environ.get("NANOVLM_SERVE_BUNDLE") or export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    )
    sample = ShapesDataset("test")[0]  # a built-in scene (the demo model's domain), held still
    scene = np.asarray(sample.image.convert("RGB").resize((160, 120)))
    from tests.video_helpers import write_clip

    # a fake camera's file: raw YUV 4:2:0 frames in a YUV4MPEG2 stream (chromium loops it)
    fake = write_clip(tmp_path / "camera.y4m", [scene] * 10, codec="rawvideo", fmt="yuv4mpegpipe")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=900,900",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={fake}",
    ):
        opts.add_argument(arg)
    with Server(bundle) as server:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        try:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "question").send_keys(sample.question)
            driver.find_element(By.ID, "camera").click()
            stats = lambda d: d.find_element(By.ID, "camera-stats").text  # noqa: E731
            WebDriverWait(driver, 60).until(lambda d: "frame answered" in stats(d) or "failed" in stats(d))
            first = stats(driver)
            WebDriverWait(driver, 60).until(lambda d: stats(d) != first and "frame answered" in stats(d))
            later = stats(driver)
            answer = driver.find_element(By.ID, "camera-answer").get_attribute("textContent")
            assert driver.find_element(By.ID, "live").get_property("videoWidth") == 160
            shot = os.environ.get("NANOVLM_CAMERA_SCREENSHOT") or str(tmp_path / "camera.png")
            assert driver.save_screenshot(shot)
            driver.find_element(By.ID, "camera").click()  # stop
        finally:
            driver.quit()
    assert "frame answered" in first, first
    reused, views = map(int, re.search(r"views reused (\d+) of (\d+)", later).groups())
    assert views > 0 and reused == views, later
    assert answer.strip()
