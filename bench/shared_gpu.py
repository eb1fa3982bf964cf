"""A shared GPU, seen and said (issue 20): how long until the service names a neighbour, and what the
neighbour costs each image.

    python bench/shared_gpu.py $OUT                 # H200, one device call, <= 5 minutes
    python bench/shared_gpu.py /tmp/sg --cpu-smoke  # the same flow on the CPU: tiny model, idle neighbours

1. `zimage-trt doctor --json` -> OUT/doctor.json (the GPU before anything runs on it).
2. The service in a process of its own (so that the neighbours, this script's children, are not its
   children): on a GPU the full-size random-weight model with a torch-compiled fp16 engine built in that
   process (`--eager`: none), `not_ready_when_shared` on; `--cpu-smoke`: `zimage-trt serve --tiny
   --device cpu --not-ready-when-shared`.
3. alone: `--images` images, one request at a time: latency mean / CV.
4. for each neighbour, a process of its own (bench/gpu_neighbour.py): `matmul` (8192x8192 bf16 products back to back) and `copy`
   (a 1 GiB buffer copied into another, back to back): the time from its CUDA context existing (and from
   its first kernel finishing) to /metrics and /v1/stats naming a new pid and /readyz answering 503
   (target <= 2 s), then `--images` images beside it (latency mean / CV, the causes /v1/stats gives each),
   a `doctor --json` while the matmul neighbour runs (OUT/doctor_shared.json), then the neighbour is
   stopped and the time until /readyz is 200 again and /metrics lists no neighbour.

Writes OUT/shared_gpu.json (rewritten after every phase, so a cut-short run keeps what it measured),
OUT/shared_gpu.log and OUT/server.log; exits 1 if a check fails. `--budget-s` stops it in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from zimage_trt.benchmark.common import PROMPT_160, Log
from zimage_trt.files import atomic_write_text
from zimage_trt.runtime.gpu_health import render_text
from zimage_trt.runtime.telemetry import summarize

ROOT = Path(__file__).resolve().parents[1]
DETECT_TARGET_S = 2.0
WATCH_PERIOD_S = 0.1
NEIGHBOURS = ("matmul", "copy")


def child_env(cpu_smoke: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    if cpu_smoke:
        env["OMP_NUM_THREADS"] = "1"
    return env


# -- the server: this script in a process of its own ------------------------------------------------
def run_server_role(args) -> int:
    """The full-size service on the GPU (what `zimage-trt serve` runs, with random weights instead of a folder)."""
    import tempfile

    import uvicorn

    from zimage_trt.benchmark.common import full_size_pipeline
    from zimage_trt.serving.app import create_app
    from zimage_trt.serving.schema import ServingLimits
    from zimage_trt.serving.service import ImageService, ServiceSettings

    engine_dir = None if args.eager else tempfile.mkdtemp(prefix="zimage-shared-gpu-")
    started = time.perf_counter()
    pipe, build_s = full_size_pipeline("cuda", args.precision, engine_dir, None if args.eager else [args.size])
    print(f"SERVER pipeline in {time.perf_counter() - started:.1f}s (engine build {build_s or 0:.1f}s)", flush=True)
    settings = ServiceSettings(limits=ServingLimits(sizes=(args.size,)), max_queue=64, not_ready_when_shared=True)
    uvicorn.run(create_app(ImageService(pipe, settings)), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# -- the driver ----------------------------------------------------------------------------------------
def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def generate(url: str, size: str, steps: int, seed: int, request_id: str) -> dict:
    body = {"prompt": PROMPT_160, "size": size, "num_inference_steps": steps, "seed": seed}
    request = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-ID": request_id})
    sent = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    timings = answer.get("timings") or {}
    per_image = timings.get("per_image_ms") or [None]
    return {"request_id": request_id, "client_ms": (time.perf_counter() - sent) * 1000.0, "server_ms": per_image[0]}


def metric_pids(text: str) -> set[int]:
    return {int(s.labels["pid"]) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "zimage_gpu_other_process_memory_bytes"}


def throttle_seconds(text: str) -> dict[str, float]:
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "zimage_gpu_throttle_seconds_total"}


class Watcher:
    """Polls /metrics, /v1/stats and /readyz every 0.1 s; keeps when each first showed what is looked for."""

    def __init__(self, url: str, baseline: set[int]):
        self.url, self.baseline = url, baseline
        self.first: dict[str, float] = {}
        self.pids: set[int] = set()
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                status, text = get(self.url + "/metrics")
                new = metric_pids(text.decode()) - self.baseline if status == 200 else set()
                if new:
                    self.first.setdefault("metrics_named", now)
                    self.pids |= new
                elif "metrics_named" in self.first:
                    self.first.setdefault("metrics_cleared", now)
                status, text = get(self.url + "/v1/stats")
                current = ((json.loads(text).get("gpu_sharing") or {}).get("current") or {}) if status == 200 else {}
                named = {p["pid"] for p in current.get("neighbours", [])} - self.baseline
                if named:
                    self.first.setdefault("stats_named", now)
                if current.get("shared"):
                    self.first.setdefault("stats_shared", now)
                status, text = get(self.url + "/readyz")
                if status == 503:
                    self.first.setdefault("readyz_503", now)
                    self.reason = json.loads(text).get("reason")
                elif status == 200 and "readyz_503" in self.first:
                    self.first.setdefault("readyz_200_again", now)
            except (OSError, ValueError):
                pass
            self._stop.wait(max(0.0, WATCH_PERIOD_S - (time.monotonic() - now)))

    def wait_for(self, key: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while key not in self.first and time.monotonic() < deadline:
            time.sleep(0.02)
        return key in self.first

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def latency(images: list[dict]) -> dict:
    out = {}
    for key in ("client_ms", "server_ms"):
        values = [i[key] for i in images if i[key] is not None]
        out[key] = {**summarize(values), "min": min(values, default=None), "max": max(values, default=None)}
    return out


def shown_latency(figures: dict) -> dict:
    """The server's per-image time where the response has it, else the client's."""
    return figures["server_ms"] if figures["server_ms"]["count"] else figures["client_ms"]


def stop_process(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="folder for shared_gpu.json, shared_gpu.log, server.log, doctor*.json")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the flow on the CPU: tiny model, neighbours without GPU work (default: off)")
    ap.add_argument("--images", type=int, default=None, help="images per phase (default: 10; 3 with --cpu-smoke)")
    ap.add_argument("--size", default=None, help="square WIDTHxHEIGHT (default: 1024x1024; 256x256 with --cpu-smoke)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: 8; 2 with --cpu-smoke)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16"), help="engine precision (default: fp16)")
    ap.add_argument("--eager", action="store_true", help="no engine build: the eager static denoiser (default: off)")
    ap.add_argument("--budget-s", type=float, default=285.0,
                    help="stop starting phases once this much wall time is spent (default: 285)")
    ap.add_argument("--detect-timeout-s", type=float, default=15.0,
                    help="longest wait for the service to name a neighbour (default: 15)")
    ap.add_argument("--role", choices=("server",), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.images = args.images or (3 if smoke else 10)
    args.size = args.size or ("256x256" if smoke else "1024x1024")
    args.steps = args.steps or (2 if smoke else 8)
    if args.role == "server":
        return run_server_role(args)
    if not args.out:
        ap.error("give the output folder, e.g. python bench/shared_gpu.py $OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "shared_gpu.log")
    started = time.monotonic()
    remaining = lambda: args.budget_s - (time.monotonic() - started)  # noqa: E731
    env = child_env(smoke)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-smoke" if smoke else "gpu",
                    "args": {k: v for k, v in vars(args).items() if k not in ("role", "port")},
                    "phases": {}, "checks": {}, "notes": []}

    def save() -> None:
        atomic_write_text(out / "shared_gpu.json", json.dumps(result, indent=2) + "\n")

    doctor = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "doctor", "--json"], capture_output=True,
                            text=True, timeout=120, env=env)
    atomic_write_text(out / "doctor.json", doctor.stdout)
    report = json.loads(doctor.stdout) if doctor.returncode == 0 else {"available": False, "reason": doctor.stderr}
    result["doctor"] = {"rc": doctor.returncode, "available": report.get("available"), "warnings": report.get("warnings")}
    log(render_text(report) if doctor.returncode == 0 else f"doctor failed: {doctor.stderr[-2000:]}")
    result["checks"]["doctor_ran"] = doctor.returncode == 0 and (smoke or report.get("available") is True)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    if smoke:
        command = [sys.executable, "-m", "zimage_trt.cli", "serve", "--tiny", "--device", "cpu", "--size", args.size,
                   "--port", str(port), "--not-ready-when-shared", "--log-level", "warning"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--role", "server", "--port", str(port), "--size",
                   args.size, "--precision", args.precision] + (["--eager"] if args.eager else [])
    server_log = open(out / "server.log", "w")
    server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=env)
    neighbours: list[subprocess.Popen] = []
    try:
        while server_state(url) != "ready":  # (/readyz may say 503 already: a neighbour there before us)
            if server.poll() is not None or remaining() < 60:
                result["notes"].append(f"the server did not become ready (exit {server.poll()}); see server.log")
                log(result["notes"][-1])
                return finish(result, save, log, ok=False)
            time.sleep(0.5)
        result["server_ready_s"] = time.monotonic() - started
        log(f"server ready after {result['server_ready_s']:.1f}s (pid {server.pid}; engine build included)")
        generate(url, args.size, args.steps, 0, "warm-0")  # the first HTTP request pays nothing else

        alone = [generate(url, args.size, args.steps, i, f"alone-{i}") for i in range(args.images)]
        _, stats = get(url + "/v1/stats")
        result["phases"]["alone"] = {"latency": latency(alone), "images": alone,
                                     "gpu_sharing": json.loads(stats).get("gpu_sharing")}
        lat = shown_latency(result["phases"]["alone"]["latency"])
        log(f"alone: {args.images} images, mean {lat['mean']:.1f} ms, CV {100 * lat['cv']:.1f}% "
            f"({lat['min']:.0f} to {lat['max']:.0f} ms)")
        save()

        for kind in NEIGHBOURS:
            if remaining() < (20 if smoke else 45):
                result["notes"].append(f"{kind} neighbour skipped: {remaining():.0f}s of the budget left")
                log(result["notes"][-1])
                continue
            result["phases"][kind] = neighbour_phase(kind, args, url, env, out, log, neighbours, smoke)
            save()
        checks(result, smoke)
    except (OSError, ValueError) as error:  # the server went away mid-run: keep what was measured
        result["notes"].append(f"stopped early: {type(error).__name__}: {error}; see server.log")
        log(result["notes"][-1])
        result["checks"]["ran_to_the_end"] = False
    finally:
        for process in neighbours:
            stop_process(process, 5)
        stop_process(server)
        server_log.close()
    return finish(result, save, log, ok=all(result["checks"].values()))


def server_state(url: str) -> str | None:
    try:
        status, text = get(url + "/healthz", timeout=2.0)
        return json.loads(text).get("state") if status == 200 else None
    except (OSError, ValueError):
        return None


def neighbour_phase(kind, args, url, env, out, log, neighbours, smoke) -> dict:
    _, text = get(url + "/metrics")
    baseline = metric_pids(text.decode())
    throttle_before = throttle_seconds(text.decode())
    watcher = Watcher(url, baseline)
    spawned = time.monotonic()
    role = "idle" if smoke else kind
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "gpu_neighbour.py"), role],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    neighbours.append(process)
    marks = {}
    for line in process.stdout:
        word, _, value = line.partition(" ")
        if word in ("CONTEXT", "WORK"):
            marks[word.lower()] = float(value)
        if "work" in marks:
            break
    phase: dict = {"pid": process.pid, "context_after_spawn_s": marks.get("context", spawned) - spawned}
    detected = False if smoke else watcher.wait_for("stats_shared", args.detect_timeout_s)
    if not smoke:
        watcher.wait_for("readyz_503", 2.0)
    doctor = doctor_file = None
    if kind == "matmul":  # the doctor's view of a shared GPU, while the images run
        doctor_file = open(out / "doctor_shared.json", "w")
        doctor = subprocess.Popen([sys.executable, "-m", "zimage_trt.cli", "doctor", "--json"], stdout=doctor_file,
                                  stderr=subprocess.DEVNULL, env=env)
    images = [generate(url, args.size, args.steps, 100 + i, f"{kind}-{i}") for i in range(args.images)]
    _, stats = get(url + "/v1/stats")
    stats = json.loads(stats)
    recent = {e.get("request_id"): e for e in stats.get("recent", [])}
    for image in images:
        image["slowed_by"] = (recent.get(image["request_id"]) or {}).get("slowed_by")
    _, text = get(url + "/metrics")
    throttle_after = throttle_seconds(text.decode())
    stopped = time.monotonic()
    stop_process(process, 10)
    if not smoke:
        watcher.wait_for("readyz_200_again", 10.0)
        watcher.wait_for("metrics_cleared", 5.0)
    watcher.stop()
    if doctor is not None:
        doctor.wait(120)
        doctor_file.close()
    first = watcher.first

    def since(key, origin):
        return round(first[key] - origin, 3) if key in first and origin is not None else None

    context, work = marks.get("context"), marks.get("work")
    phase.update({
        "detected": detected,
        "pids_named": sorted(watcher.pids), "pid_is_the_one_started": process.pid in watcher.pids,
        "from_context_s": {k: since(k, context) for k in ("metrics_named", "stats_named")},
        "from_work_s": {k: since(k, work) for k in ("metrics_named", "stats_named", "stats_shared", "readyz_503")},
        "from_spawn_s": {k: since(k, spawned) for k in ("metrics_named", "stats_named", "stats_shared", "readyz_503")},
        "readyz_reason": watcher.reason,
        "gpu_sharing_beside_it": stats.get("gpu_sharing"),  # what NVML lists here, whose pid is ours, ...
        "after_stop_s": {k: since(k, stopped) for k in ("readyz_200_again", "metrics_cleared")},
        "latency": latency(images), "images": images,
        "images_named_shared": sum(any("shared GPU" in c for c in (i["slowed_by"] or [])) for i in images),
        "throttle_seconds": {r: round(throttle_after.get(r, 0.0) - throttle_before.get(r, 0.0), 3)
                             for r in throttle_after},
    })
    lat = shown_latency(phase["latency"])
    log(f"{kind} neighbour pid {process.pid}: context {phase['context_after_spawn_s']:.1f}s after spawn; named "
        f"{phase['from_context_s']} after its context, {phase['from_work_s']} after its first kernel; "
        f"{args.images} images mean {lat['mean']:.1f} ms, CV {100 * lat['cv']:.1f}% ({lat['min']:.0f} to "
        f"{lat['max']:.0f} ms); named shared on {phase['images_named_shared']}/{args.images}; causes "
        f"{sorted({c for i in images for c in (i['slowed_by'] or [])})}; after it stopped {phase['after_stop_s']}; "
        f"readyz reason: {watcher.reason}")
    return phase


def checks(result: dict, smoke: bool) -> None:
    phases = result["phases"]
    result["checks"]["alone_images_served"] = bool(phases.get("alone", {}).get("images"))
    for kind in NEIGHBOURS:
        phase = phases.get(kind)
        if phase is None:
            result["checks"][f"{kind}_ran"] = False
            continue
        if smoke:  # no GPU: nothing to name; the flow and the fields are what is checked
            result["checks"][f"{kind}_images_served"] = len(phase["images"]) == result["args"]["images"]
            result["checks"][f"{kind}_not_named_without_a_gpu"] = not phase["pids_named"]
            continue
        named = [v for v in phase["from_context_s"].values() if v is not None]
        result["checks"][f"{kind}_named_in_metrics_and_stats_within_2s"] = (
            len(named) == 2 and max(named) <= DETECT_TARGET_S)
        readyz = phase["from_work_s"]["readyz_503"]
        result["checks"][f"{kind}_readyz_503_within_2s_of_its_work"] = readyz is not None and readyz <= DETECT_TARGET_S
        result["checks"][f"{kind}_readyz_200_after_it_left"] = phase["after_stop_s"]["readyz_200_again"] is not None
        result["checks"][f"{kind}_images_name_the_shared_gpu"] = phase["images_named_shared"] >= len(phase["images"]) // 2


def finish(result: dict, save, log, ok: bool) -> int:
    save()
    failed = [name for name, passed in result["checks"].items() if not passed]
    log(f"checks: {json.dumps(result['checks'])}")
    log(f"SHARED_GPU: {'PASS' if ok and not failed else 'FAIL ' + ', '.join(failed)}")
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
