"""`zimage-trt serve` as a real process on a free loopback port (the tiny model on the CPU).

- the bind rule: a public address without an API key is refused before anything loads;
- a load test: 200 requests from 32 concurrent clients, every one answered, each image equal to the same
  request run alone, no request lost or run twice, the server's memory flat;
- SIGTERM: the running request finishes, the waiting ones are answered 503 at once, the process exits 0.

The figures these print go to RELIABILITY.md ("Serving").
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from serving_server import free_port

KEY = "test-key-" + "x" * 24
STARTUP_S = 180
URL_PATH = "/v1/images/generations"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread: the same CPU kernels as the test's solo runs
    env.pop("ZIMAGE_TRT_API_KEY", None)
    return env


def start_server(tmp_path, *extra: str, launcher=(sys.executable,)):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(
        [*launcher, "-m", "zimage_trt.cli", "serve", "--tiny", "--device", "cpu", "--port", str(port),
         "--api-key-file", str(key_file), "--log-level", "warning", *extra],
        env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert process.poll() is None, f"server exited: {_read(log)}"
        assert time.monotonic() < deadline, f"server not ready in {STARTUP_S} s: {_read(log)}"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return process, url, log
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def post(url: str, body: dict, request_id: str | None = None, key: str | None = KEY, timeout: float = 300):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if request_id:
        headers["X-Request-ID"] = request_id
    request = urllib.request.Request(url + URL_PATH, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def get_json(url: str, path: str):
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def solo(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    out = pipe(prompt, height=256, width=256, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed))
    return np.asarray(out.images[0], dtype=np.int16)


def stop(process, log) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    log.close()


def test_a_public_address_without_a_key_is_refused_before_loading(tmp_path):
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "serve", "--tiny", "--device", "cpu",
                          "--host", "0.0.0.0", "--port", str(free_port())],
                         env=server_env(), capture_output=True, text=True, timeout=STARTUP_S)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in out.stderr
    assert "--api-key-file" in out.stderr and "ZIMAGE_TRT_API_KEY" in out.stderr
    assert "Traceback" not in out.stderr
    print(f"\nrefused in {time.monotonic() - started:.1f} s (process start included)")


def test_load_200_requests_from_32_clients(tmp_path, tiny_cpu_pipe):
    process, url, log = start_server(tmp_path, "--max-queue", "64")
    try:
        server = psutil.Process(process.pid)
        assert post(url, {"prompt": "x"}, key=None)[0] == 401
        assert post(url, {"prompt": "x"}, key="wrong-key-" + "y" * 20)[0] == 401
        # 20 distinct requests (prompt, seed, steps), each sent 10 times: all must match their solo run.
        distinct = [(f"prompt {i % 4}: a fox in the snow", 1000 + i, 1 + i % 3) for i in range(20)]
        expected = {(p, s, n): solo(tiny_cpu_pipe, p, s, n) for p, s, n in distinct}
        jobs = [(f"load-{i:03d}", distinct[i % len(distinct)]) for i in range(200)]
        rss = {}
        latencies = {}
        done = [0]
        lock = threading.Lock()

        def one(job):
            request_id, (prompt, seed, steps) = job
            sent = time.perf_counter()
            status, body, headers = post(url, {"prompt": prompt, "seed": seed, "num_inference_steps": steps,
                                               "size": "256x256"}, request_id=request_id)
            with lock:
                latencies[request_id] = time.perf_counter() - sent
                done[0] += 1
                if done[0] in (25, 50, 100, 150, 200):
                    rss[done[0]] = server.memory_info().rss
            return request_id, status, body, headers

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(one, jobs))
        elapsed = time.perf_counter() - started

        assert [status for _, status, _, _ in results] == [200] * 200, [b for _, s, b, _ in results if s != 200][:3]
        for (request_id, _, body, headers), (_, key) in zip(results, jobs):
            assert body["request_id"] == request_id == headers["x-request-id"]  # the answer to this request
            assert body["data"][0]["seed"] == key[1]
            assert np.abs(decode(body["data"][0]["b64_json"]) - expected[key]).max() <= 1, request_id
        stats = get_json(url, "/v1/stats")
        ran = [entry["request_id"] for entry in stats["recent"] if entry["request_id"].startswith("load-")]
        assert sorted(ran) == sorted(request_id for request_id, _ in jobs)  # each ran exactly once
        assert stats["counts"]["completed"] == 200 and stats["counts"]["failed"] == 0
        assert stats["queue"]["depth"] == 0
        growth = (rss[200] - rss[50]) / 2**20
        assert growth < 64, f"server RSS grew {growth:.1f} MiB from request 50 to 200: {rss}"
        ordered = sorted(latencies.values())
        print(f"\nload: 200 requests, 32 clients, {elapsed:.1f} s, {200 / elapsed:.2f} req/s; client latency p50 "
              f"{ordered[99]:.2f} s p95 {ordered[189]:.2f} s max {ordered[-1]:.2f} s; server per image p50 "
              f"{stats['latency']['per_image_ms']['p50']:.0f} ms; RSS MiB "
              + ", ".join(f"after {k}: {v / 2**20:.1f}" for k, v in sorted(rss.items())))
    finally:
        stop(process, log)


def test_sigterm_finishes_the_running_request_and_answers_the_waiting_ones_503(tmp_path, tiny_cpu_pipe):
    process, url, log = start_server(tmp_path, "--max-steps", "1000")
    try:
        # A short request first: a real process gives the image the pipeline gives alone.
        status, body, _ = post(url, {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 2, "size": "256x256"})
        assert status == 200
        assert np.abs(decode(body["data"][0]["b64_json"]) - solo(tiny_cpu_pipe, "a lighthouse", 3, 2)).max() <= 1

        results = {}

        def send(name, steps):
            results[name] = (*post(url, {"prompt": name, "seed": 1, "num_inference_steps": steps,
                                         "size": "256x256"}), time.perf_counter())

        running = threading.Thread(target=send, args=("running", 150))  # several seconds on a CPU
        running.start()
        deadline = time.monotonic() + 60
        while (get_json(url, "/v1/stats")["queue"]["running"] or {}).get("step", 0) < 2:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.05)
        waiting = [threading.Thread(target=send, args=(f"waiting-{i}", 2)) for i in range(3)]
        for thread in waiting:
            thread.start()
        while get_json(url, "/v1/stats")["queue"]["depth"] < 3:
            assert time.monotonic() < deadline, "the waiting requests never queued"
            time.sleep(0.05)

        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        for thread in waiting:
            thread.join(60)
        for i in range(3):
            status, body, headers, answered = results[f"waiting-{i}"]
            assert status == 503 and body["error"]["code"] == "shutting_down" and "retry-after" in {
                k.lower() for k in headers}
        waiting_answered = max(results[f"waiting-{i}"][3] for i in range(3)) - signalled
        running.join(120)
        status, body, _, finished = results["running"]
        assert status == 200 and body["data"][0]["seed"] == 1 and decode(body["data"][0]["b64_json"]).shape == (256, 256, 3)
        assert process.wait(60) == 0
        exited = time.perf_counter() - signalled
        text = _read(log)
        assert "Traceback" not in text
        print(f"\nSIGTERM: 3 waiting answered 503 within {waiting_answered * 1000:.0f} ms; the running request "
              f"(150 steps) finished {finished - signalled:.2f} s after the signal; process exited 0 after {exited:.2f} s")
    finally:
        stop(process, log)


def test_serve_under_torchrun_rank_0_answers_http_and_the_other_rank_computes_its_share(tmp_path, tiny_cpu_pipe):
    # Two processes over gloo make each image (the tiny model has 2 heads: one each).
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    process, url, log = start_server(tmp_path, "--sequence-parallel", "2", "--timeout", "4", "--max-steps", "1000",
                                     launcher=torchrun)
    try:
        ranks = psutil.Process(process.pid).children()
        assert len(ranks) == 2
        rank_0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        # The image two ranks make equals one process's (latents within 1e-5: a pixel level at most).
        status, body, _ = post(url, {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 2, "size": "256x256"})
        assert status == 200, body
        assert np.abs(decode(body["data"][0]["b64_json"]) - solo(tiny_cpu_pipe, "a lighthouse", 3, 2)).max() <= 1
        # A request past --timeout is stopped at its next step on both ranks (504), and the group goes on.
        started = time.perf_counter()
        status, body, _ = post(url, {"prompt": "a long one", "seed": 1, "num_inference_steps": 1000, "size": "256x256"})
        assert status == 504 and body["error"]["code"] == "timeout", body
        assert time.perf_counter() - started < 15
        status, body, _ = post(url, {"prompt": "a fox", "seed": 5, "num_inference_steps": 2, "size": "256x256"})
        assert status == 200
        assert np.abs(decode(body["data"][0]["b64_json"]) - solo(tiny_cpu_pipe, "a fox", 5, 2)).max() <= 1
        # SIGTERM to rank 0: it shuts down gracefully and its closing pipeline releases rank 1; all exit 0.
        signalled = time.perf_counter()
        rank_0.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, _read(log)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
        assert "Traceback" not in _read(log)
        print(f"\ntorchrun serve: rank 0 stopped, rank 1 released, torchrun exited 0 "
              f"{time.perf_counter() - signalled:.1f} s after SIGTERM")
    finally:
        for rank in psutil.Process(process.pid).children() if process.poll() is None else []:
            rank.kill()
        stop(process, log)
