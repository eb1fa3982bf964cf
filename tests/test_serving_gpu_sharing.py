"""A shared GPU, seen and said: the service in process (TestClient, the tiny model on the CPU) with its GPU
monitor reading a recording NVML double (tests/nvml_double.py) that a test fills with a neighbour.

/v1/stats names the neighbour per image and now, /metrics has the neighbour gauges and the throttle
counters, --not-ready-when-shared turns /readyz 503 while the neighbour computes and back to 200 when
it leaves, the request path itself makes no NVML call, and the dashboard shows the cause.
The same on the H200 with real neighbours: bench/shared_gpu.py.
"""

from __future__ import annotations

import json
import os
import sys
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from nvml_double import GIB, RecordingNvml, reasons
from zimage_trt.runtime.gpu_monitor import GpuMonitor
from zimage_trt.serving.app import create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings

SIZE = "256x256"
URL = "/v1/images/generations"
NEIGHBOUR = 1234
WAIT_S = 60
DASHBOARD = Path(__file__).resolve().parents[1] / "src" / "zimage_trt" / "serving" / "dashboard.js"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def body(seed=1) -> dict:
    return {"prompt": "a red fox in the snow", "size": SIZE, "num_inference_steps": 2, "seed": seed}


def served(pipe, nvml, interval_s=0.0, **settings):
    monitor = GpuMonitor(nvml, ("handle", 0), name="NVIDIA H200", interval_s=interval_s)
    service = ImageService(pipe, ServiceSettings(limits=ServingLimits(sizes=(SIZE,)), warm_steps=1, **settings),
                           gpu_monitor=monitor)
    return service, monitor


def a_neighbour_starts(nvml: RecordingNvml, used=40 * GIB, name="python3") -> None:
    nvml.processes.append((NEIGHBOUR, used))
    nvml.process_names[NEIGHBOUR] = f"/usr/bin/{name}"
    nvml.process_util = [(NEIGHBOUR, 97, 35), (os.getpid(), 60, 20)]


def the_neighbour_leaves(nvml: RecordingNvml) -> None:
    nvml.processes = [p for p in nvml.processes if p[0] != NEIGHBOUR]
    nvml.process_util = [(os.getpid(), 60, 20)]


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_stats_metrics_and_readyz_follow_a_neighbour_in_and_out(tiny_cpu_pipe):
    nvml = RecordingNvml()
    service, monitor = served(tiny_cpu_pipe, nvml, not_ready_when_shared=True)
    with TestClient(create_app(service)) as client:
        assert service.wait_ready(WAIT_S), service.failure
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        alone = client.post(URL, json=body(1))
        assert alone.status_code == 200
        assert client.get("/v1/stats").json()["recent"][-1]["slowed_by"] == []

        a_neighbour_starts(nvml)
        nvml.throttle = reasons("SwPowerCap")
        monitor.poll()
        time.sleep(0.01)
        monitor.poll()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json() == {"ready": False, "state": "ready",
                                "reason": "another process computes on this GPU: pid 1234 (python3, 40 GiB)"}
        shared = client.post(URL, json=body(2))  # not ready is advice to a balancer: requests are still served
        assert shared.status_code == 200, shared.text

        stats = json.loads(client.get("/v1/stats").text,
                           parse_constant=lambda name: pytest.fail(f"{name} in /v1/stats"))
        last = stats["recent"][-1]
        assert last["slowed_by"] == ["shared GPU: pid 1234, 40 GiB", "power cap"]
        assert last["gpu_seen"]["neighbours"] == [{"pid": NEIGHBOUR, "name": "python3", "used_mib": 40960.0,
                                                   "computing": True}]
        assert last["gpu_seen"]["throttle"] == {"sw_power_cap": 1.0}
        current = stats["gpu_sharing"]["current"]
        assert current["shared"] and current["causes"] == ["shared GPU: pid 1234, 40 GiB", "power cap"]
        assert [p["pid"] for p in current["neighbours"]] == [NEIGHBOUR]  # this process (20 GiB) is not one
        assert stats["gpu_sharing"]["not_ready_when_shared"] is True

        metrics = samples(client.get("/metrics").text)
        gpu = ("gpu", "NVIDIA H200")
        assert metrics[("zimage_gpu_other_processes", (gpu,))] == 1
        assert metrics[("zimage_gpu_other_processes_computing", (gpu,))] == 1
        assert metrics[("zimage_gpu_shared", (gpu,))] == 1
        assert metrics[("zimage_gpu_other_process_memory_bytes", (gpu, ("name", "python3"), ("pid", "1234")))] \
            == 40 * GIB
        assert metrics[("zimage_gpu_throttle_seconds_total", (gpu, ("reason", "sw_power_cap")))] > 0

        the_neighbour_leaves(nvml)
        nvml.throttle = 0
        monitor.poll()
        assert client.get("/readyz").status_code == 200
        metrics = samples(client.get("/metrics").text)
        assert metrics[("zimage_gpu_other_processes", (gpu,))] == 0 and metrics[("zimage_gpu_shared", (gpu,))] == 0
        assert not any(name == "zimage_gpu_other_process_memory_bytes" for name, _ in metrics)
        held = metrics[("zimage_gpu_throttle_seconds_total", (gpu, ("reason", "sw_power_cap")))]
        assert held > 0  # a counter keeps what it counted


def test_without_the_flag_a_shared_gpu_stays_ready_but_is_said(tiny_cpu_pipe):
    nvml = RecordingNvml()
    service, monitor = served(tiny_cpu_pipe, nvml)
    with TestClient(create_app(service)) as client:
        assert service.wait_ready(WAIT_S), service.failure
        a_neighbour_starts(nvml)
        monitor.poll()
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/stats").json()["gpu_sharing"]["current"]["shared"] is True


def test_the_request_path_makes_no_nvml_call(tiny_cpu_pipe):
    nvml = RecordingNvml()
    service, monitor = served(tiny_cpu_pipe, nvml)  # interval 0: no thread, so every call here is the request's
    with TestClient(create_app(service)) as client:
        assert service.wait_ready(WAIT_S), service.failure
        before = len(nvml.calls)
        assert client.post(URL, json=body(3)).status_code == 200
        assert nvml.calls[before:] == []


def test_the_background_monitor_turns_readyz_within_2_s(tiny_cpu_pipe):
    nvml = RecordingNvml()
    service, monitor = served(tiny_cpu_pipe, nvml, interval_s=0.25, not_ready_when_shared=True)
    with TestClient(create_app(service)) as client:
        assert service.wait_ready(WAIT_S), service.failure
        assert client.get("/readyz").status_code == 200

        def seconds_until(status: int) -> float:
            started = time.monotonic()
            while client.get("/readyz").status_code != status:
                assert time.monotonic() - started < 10, f"/readyz never answered {status}"
                time.sleep(0.02)
            return time.monotonic() - started

        a_neighbour_starts(nvml)
        assert seconds_until(503) <= 2.0
        the_neighbour_leaves(nvml)
        assert seconds_until(200) <= 2.0
    assert not monitor._thread.is_alive()  # closing the service stopped the monitor


def test_without_a_gpu_the_service_has_no_sharing_section(tiny_cpu_pipe):
    service = ImageService(tiny_cpu_pipe, ServiceSettings(limits=ServingLimits(sizes=(SIZE,)), warm_steps=1,
                                                          not_ready_when_shared=True))
    with TestClient(create_app(service)) as client:
        assert service.wait_ready(WAIT_S), service.failure
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/stats").json()["gpu_sharing"] is None
        assert "zimage_gpu_other_processes" not in client.get("/metrics").text


def test_serve_has_the_flag_off_by_default(capsys):
    from zimage_trt import cli
    from zimage_trt.serving.command import build_service

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--not-ready-when-shared answer /readyz 503 (with the reason) while another process computes on the " \
           "GPU" in help_text and "(default: False)" in help_text
    parser_args = ["--tiny", "--device", "cpu"]
    from zimage_trt.serving import settings as serve_settings
    import argparse

    ap = argparse.ArgumentParser()
    serve_settings.add_arguments(ap)
    assert build_service(ap.parse_args(parser_args)).settings.not_ready_when_shared is False
    assert build_service(ap.parse_args(parser_args + ["--not-ready-when-shared"])).settings.not_ready_when_shared


# -- the dashboard ---------------------------------------------------------------------------------
def test_the_dashboard_shows_the_cause_of_a_slowed_image(tiny_cpu_pipe):
    service = ImageService(tiny_cpu_pipe, ServiceSettings(limits=ServingLimits(sizes=(SIZE,))))
    with TestClient(create_app(service)) as client:
        page, script = client.get("/").text, client.get("/dashboard.js").text
    assert 'id="shared"' in page and 'id="slowed"' in page  # the badge and the table of slowed images
    assert "slowed_by" in script and "gpu_sharing" in script and "causes" in script


@pytest.mark.slow
def test_the_dashboard_script_renders_the_causes(tmp_path):
    """dashboard.js run by node over a stand-in page: the badge and the slowed-images table say the cause."""
    node = shutil.which("node")
    assert node, "this test needs node (apt-get install nodejs)"
    stats = {"state": "ready", "device": "cuda:0", "sizes": [SIZE], "queue": {"depth": 0, "waiting": []},
             "counts": {"completed": 2}, "last_steps_ms": [10.0, 10.0], "gpu": {"name": "NVIDIA H200"},
             "recent": [{"t": 100.0, "per_image_ms": 845.0, "slowed_by": []},
                        {"t": 102.0, "per_image_ms": 1657.0, "slowed_by": ["shared GPU: pid 1234, 40 GiB"],
                         "task": "inpaint"}],
             "gpu_sharing": {"current": {"shared": True, "causes": ["shared GPU: pid 1234, 40 GiB", "power cap"]}}}
    harness = tmp_path / "harness.js"
    harness.write_text(NODE_HARNESS.replace("STATS", json.dumps(stats)).replace("SCRIPT", json.dumps(str(DASHBOARD))))
    done = subprocess.run([node, str(harness)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert shown["shared"] == "shared GPU: pid 1234, 40 GiB · power cap" and shown["sharedShown"]
    assert shown["slowed"] == [["inpaint", "1.66 s", "shared GPU: pid 1234, 40 GiB"]]  # (task, time, cause)
    assert shown["slowedPoints"] == 1


NODE_HARNESS = r"""
const fs = require("fs");
const elements = {};
function element(id) {
  if (!elements[id]) {
    const el = { id, textContent: "", value: "", className: "", style: {}, dataset: {}, options: [], children: [],
      classList: { add() {}, remove() {} }, addEventListener() {}, clientWidth: 400, clientHeight: 190,
      replaceChildren(...kids) { this.children = kids; this.options = kids; },
      appendChild(kid) { this.children.push(kid); },
      getContext() { return new Proxy({}, { get: (t, k) => k === "measureText" ? () => ({ width: 10 }) : () => {} }); } };
    el.tBodies = [el];
    elements[id] = el;
  }
  return elements[id];
}
global.document = { getElementById: element, createElement: (tag) => element(tag + Math.random()) };
global.window = { devicePixelRatio: 1 };
global.sessionStorage = { getItem: () => "", setItem() {} };
global.fetch = async () => ({ status: 200, ok: true, json: async () => (STATS) });
global.setTimeout = () => {};
eval(fs.readFileSync(SCRIPT, "utf8"));
setImmediate(() => {
  const rows = element("slowed").children.map((tr) => tr.children.slice(1).map((td) => td.textContent));
  console.log(JSON.stringify({ shared: element("shared").textContent, sharedShown: element("shared").style.display !== "none",
    slowed: rows, slowedPoints: window.dashboard.slowedPoints }));
});
"""


# -- the GPU scripts' flows on the CPU (they run for real on the H200) ------------------------------
BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(*argv, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_shared_gpu_script_runs_its_flow_in_cpu_smoke_mode(tmp_path):
    done = run_script(BENCH / "shared_gpu.py", tmp_path, "--cpu-smoke", "--images", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SHARED_GPU: PASS" in done.stdout
    result = json.loads((tmp_path / "shared_gpu.json").read_text())
    assert list(result["phases"]) == ["alone", "matmul", "copy"]
    for phase in ("matmul", "copy"):
        assert len(result["phases"][phase]["images"]) == 2 and result["phases"][phase]["pids_named"] == []
    assert json.loads((tmp_path / "doctor.json").read_text())["available"] is False
    assert (tmp_path / "server.log").exists() and (tmp_path / "shared_gpu.log").read_text().endswith("PASS\n")


@pytest.mark.slow
def test_serving_gpu_script_runs_its_flow_on_the_tiny_model(tmp_path):
    done = run_script(BENCH / "serving_gpu.py", "--out", tmp_path, "--tiny", "--device", "cpu", "--images", "3",
                      "--clients", "2", "--steps", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "serving_gpu.json").read_text())
    assert result["checks"] == {"stream_steps_arrive_while_running": True}  # the GPU-only checks apply on a GPU
    assert result["http"]["images_per_s"] > 0 and "SERVING_GPU: PASS" in (tmp_path / "serving_gpu.log").read_text()
