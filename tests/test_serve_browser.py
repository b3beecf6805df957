"""The page at / in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
a multi-turn chat with an image, settings and stop, and the camera mode, read from the DOM.

NANOVLM_SERVE_BUNDLE=DIR runs it on another bundle (e.g. the demo's trained one) and
NANOVLM_SCREENSHOT=FILE.png keeps the chat's screenshot (docs/serve_chat.png comes from such a run).
"""

import os
import re
import shutil
import time

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


def _metric(server, name: str) -> float:
    import urllib.request

    for line in urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _finders(driver):
    """(an element by id, the assistant turns on the page) for `driver`."""
    from selenium.webdriver.common.by import By

    return (
        lambda id_: driver.find_element(By.ID, id_),
        lambda: driver.find_elements(By.CSS_SELECTOR, "#chat .turn.assistant"),
    )


def test_a_chat_with_an_image_follow_ups_and_settings(endless, tmp_path):
    """The page as a chat, driven from the keyboard: an image attached, a question, a follow-up that
    reuses the first turn's work (cached tokens shown), max tokens from Settings with the cut said,
    each answer equal to the runtime's for the same conversation; a bad JSON schema named before
    anything is sent; a dropped image attached and removed. NANOVLM_SERVE_BUNDLE=DIR runs it on another bundle, NANOVLM_SCREENSHOT=FILE.png
    keeps the screenshot (docs/serve_chat.png comes from such a run)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = os.environ.get("NANOVLM_SERVE_BUNDLE") or endless
    sample = ShapesDataset("test")[0]  # a built-in scene and question (the demo model's domain)
    picture = tmp_path / "scene.png"
    sample.image.save(picture)
    q1, q2, n = sample.question, "And what else is in the picture?", 12
    pipe = VLMPipeline.from_bundle(bundle)
    a1 = pipe.chat([str(picture)], [], q1, n)
    a2 = pipe.chat([str(picture)], [(q1, a1)], q2, n)
    cut2 = pipe.last_finish_reason == "length"
    with Server(bundle) as server:
        driver = _browser()

        find, turns = _finders(driver)

        def answered(k: int):  # k answers on the page, the last with its line under it
            return lambda d: len(turns()) == k and turns()[-1].find_element(By.CLASS_NAME, "meta").text

        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 30).until(lambda d: find("model").text != "…")
            find("settings").find_element(By.TAG_NAME, "summary").send_keys(Keys.ENTER)  # opens Settings
            find("max-tokens").clear()
            find("max-tokens").send_keys(str(n))
            find("json-schema").send_keys("{not json")
            find("question").send_keys(q1, Keys.ENTER)
            assert "JSON schema in Settings is not JSON" in find("status").text and not turns()
            find("json-schema").clear()

            find("image").send_keys(str(picture))
            WebDriverWait(driver, 10).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1
            )
            find("send").click()  # the question typed above went back to the box, unsent
            WebDriverWait(driver, 60).until(answered(1))
            find("question").send_keys(q2, Keys.ENTER)
            WebDriverWait(driver, 60).until(answered(2))
            texts = [t.find_element(By.CLASS_NAME, "text").get_attribute("textContent") for t in turns()]
            metas = [t.find_element(By.CLASS_NAME, "meta").text for t in turns()]
            shot = os.environ.get("NANOVLM_SCREENSHOT") or str(tmp_path / "chat.png")
            assert driver.save_screenshot(shot)

            # a dropped image is attached (and removed with its button)
            driver.execute_script(
                """const c = document.createElement("canvas"); c.width = c.height = 8;
                c.toBlob((blob) => { const dt = new DataTransfer();
                  dt.items.add(new File([blob], "dropped.png", { type: "image/png" }));
                  document.getElementById("ask").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })); });"""
            )
            WebDriverWait(driver, 10).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1
            )
            driver.find_element(By.CSS_SELECTOR, "#attachments button").click()
            assert not driver.find_elements(By.CSS_SELECTOR, "#attachments img")

        finally:
            driver.quit()
    assert texts == [a1, a2] and a1.strip()
    cached, prompt = map(int, re.search(r"(\d+) of (\d+) prompt tokens cached", metas[1]).groups())
    assert 0 < cached < prompt, metas[1]
    assert (f"cut at {n} tokens" in metas[1]) == cut2 and "first token" in metas[1], metas
    assert Image.open(shot).size[0] > 0


def test_escape_stops_a_long_answer_and_the_server_drops_it(endless):
    """Esc (or the Stop button) closes the stream: the page says so and keeps what was shown, and the
    server cancels the answer (a 499, and its row in the batch is freed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with Server(endless) as server:
        driver = _browser()

        find, turns = _finders(driver)

        try:
            driver.get(server.url + "/")
            find("settings").find_element(By.TAG_NAME, "summary").send_keys(Keys.ENTER)
            find("max-tokens").clear()
            find("max-tokens").send_keys("3000")
            find("question").send_keys("Go on and on.", Keys.ENTER)
            WebDriverWait(driver, 60).until(
                lambda d: (
                    turns() and turns()[-1].find_element(By.CLASS_NAME, "text").get_attribute("textContent")
                )
            )
            find("question").send_keys(Keys.ESCAPE)
            WebDriverWait(driver, 30).until(lambda d: find("status").text == "stopped")
            stopped = turns()[-1].find_element(By.CLASS_NAME, "meta").text
            deadline = time.monotonic() + 30
            while _metric(server, "nanovlm_running_batch_size") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _metric(server, "nanovlm_running_batch_size") == 0
            while _metric(server, 'nanovlm_requests_total{status="499"}') != 1:  # counted on the event loop
                assert time.monotonic() < deadline, "the stop was never counted as a 499"
                time.sleep(0.05)
        finally:
            driver.quit()
    assert stopped.startswith("stopped by you after") and "dropped the rest" in stopped, stopped


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
