"""The dashboard in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

The page loads from a real server over loopback, a generation typed into the page's prompt box comes
back as an image (the very image the pipeline makes alone for that seed), the latency chart gains
a point, and the tasks table says which task each request ran (the page's text to image, a client's
inpainting edit). A screenshot is saved (to $ZIMAGE_DASHBOARD_SCREENSHOT when set: how docs/dashboard.png is made).
CI needs `apt-get install -y chromium chromium-driver`.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx2 as httpx
import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serving_server import running_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 90

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1050"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_generates_an_image_and_the_latency_chart_gains_a_point(tiny_cpu_pipe, browser, tmp_path):
    with running_server(tiny_cpu_pipe) as (url, service):
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda b: b.find_element(By.ID, "state").text == "ready")
        latency = browser.find_element(By.ID, "latency")
        assert latency.get_attribute("data-points") == "0"
        assert browser.find_element(By.ID, "size").get_attribute("value") == "256x256"

        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a lighthouse on a cliff at dusk")
        for field, value in (("steps-input", "2"), ("seed", "5")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "go").click()

        image = wait.until(lambda b: b.find_elements(By.ID, "generated") or False)[0]
        wait.until(lambda b: b.execute_script("return document.getElementById('generated').complete"))
        assert browser.execute_script("return document.getElementById('generated').naturalWidth") == 256
        assert "seed 5" in browser.find_element(By.ID, "message").text
        src = image.get_attribute("src")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)
        alone = tiny_cpu_pipe("a lighthouse on a cliff at dusk", height=256, width=256, num_inference_steps=2,
                              generator=torch.Generator("cpu").manual_seed(5)).images[0]
        assert np.abs(shown - np.asarray(alone, dtype=np.int16)).max() <= 1  # same computation, another thread

        wait.until(lambda b: b.find_element(By.ID, "latency").get_attribute("data-points") == "1")
        assert browser.execute_script("return window.dashboard.latencyPoints") == 1
        # The chart really drew something: the canvas is not blank.
        drawn = browser.execute_script(
            "const c = document.getElementById('latency'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4)"
            " if (d[i]) n++; return n;")
        assert drawn > 100
        assert service.stats()["counts"]["completed"] == 1

        # Which task each request ran: the page's generation, then an inpainting edit sent by a client.
        def task_rows(b):
            # Read in one script: the page re-renders the table every poll, so rows found by one call and
            # read by the next can be gone (selenium's StaleElementReferenceException, seen in CI).
            return b.execute_script("return [...document.querySelectorAll('#tasks tbody tr')]"
                                    ".map((tr) => [...tr.querySelectorAll('td')].map((td) => td.innerText.trim()));")

        wait.until(lambda b: [row[:3] for row in task_rows(b)] == [["text-to-image", "1", "1"]])
        assert browser.find_element(By.ID, "tasks-served").text == "text-to-image, image-to-image, inpaint"
        picture, mask = Image.new("RGB", (256, 256), (90, 140, 200)), Image.new("L", (256, 256), 255)
        files = {name: (name + ".png", _png(image), "image/png") for name, image in (("image", picture), ("mask", mask))}
        edit = httpx.post(url + "/v1/images/edits", files=files, timeout=WAIT_S,
                          data={"prompt": "a red door", "num_inference_steps": "1"})
        assert edit.status_code == 200 and edit.json()["task"] == "inpaint", edit.text
        wait.until(lambda b: [row[:3] for row in task_rows(b)] == [["inpaint", "1", "1"], ["text-to-image", "1", "1"]])

        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        target = os.environ.get("ZIMAGE_DASHBOARD_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
