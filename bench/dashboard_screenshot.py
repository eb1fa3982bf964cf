"""Screenshot of the dashboard under load: the tiny model behind `zimage-trt serve`'s app, a few clients
sending requests, headless chromium taking the picture while requests wait in the queue.

    python bench/dashboard_screenshot.py --out docs/dashboard.png               # CPU (no GPU charts)
    python bench/dashboard_screenshot.py --device cuda --out docs/dashboard.png # on a GPU: NVML charts too

Needs the serve extra, selenium, /usr/bin/chromium and /usr/bin/chromedriver.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import urllib.request

import torch
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.serving.app import create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.testing.tiny import make_tiny_components


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="docs/dashboard.png", help="PNG to write")
    ap.add_argument("--device", default="cpu", help="where the tiny model runs")
    ap.add_argument("--size", default="256x256", help="served size")
    ap.add_argument("--requests", type=int, default=40, help="requests sent before the picture")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    args = ap.parse_args()

    torch.set_num_threads(1)
    pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device=args.device)
    service = ImageService(pipe, ServiceSettings(limits=ServingLimits(sizes=(args.size,))))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and service.ready):
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1080"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/")
        counter = iter(range(args.requests))
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                post(url + "/v1/images/generations", {"prompt": f"a red fox, study {i}", "size": args.size,
                                                       "num_inference_steps": 4 + 4 * (i % 2), "seed": i})

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A generation from the page, then a burst behind it: the picture shows the page's image and
        # requests waiting with their ETAs.
        driver.execute_script("document.getElementById('steps-input').value = 8;"
                              "document.getElementById('seed').value = 7; document.getElementById('go').click();")
        time.sleep(0.2)
        burst = [threading.Thread(target=post, args=(url + "/v1/images/generations",
                                                     {"prompt": "burst", "size": args.size, "num_inference_steps": 8,
                                                      "seed": s})) for s in range(8)]
        for thread in burst:
            thread.start()
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.ID, "generated"))
        time.sleep(1.2)  # one more poll of v1/stats
        driver.save_screenshot(args.out)
        for thread in burst:
            thread.join()
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
