"""The one-GPU service on a GPU: what HTTP costs over calling the pipeline, and the GPU readings.

    python bench/serving_gpu.py --out $OUT                            # H200: full-size random weights, fp16
                                                                      # torch-compiled engine (built here), 1024x1024
    python bench/serving_gpu.py --out /tmp/sg --tiny --device cpu     # the same flow on the tiny model

1. direct: `--images` images back to back through `pipe(...)`: images/s and per-image ms;
2. HTTP: the same number of requests through the app under uvicorn on loopback, from `--clients`
   concurrent clients: images/s, client latency p50/p95, and the ratio to direct (target >= 0.97);
3. streaming: the step events of one `?stream=true` request arrive while it runs (not all at the end);
4. telemetry: /metrics has the NVML series (SM clock, temperature, power, utilisation, memory; the other
   processes on the GPU and the throttle-reason seconds) and /v1/stats the GPU readings.

Writes serving_gpu.json and serving_gpu.log into the --out folder, prints the JSON, and exits 1 if a check
fails (the throughput and NVML checks apply on a GPU only).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn

from zimage_trt.benchmark.common import PROMPT_160, Log, full_size_pipeline
from zimage_trt.engines.manifest import find_manifests
from zimage_trt.files import atomic_write_text
from zimage_trt.model.shapes import Resolution
from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.serving.app import create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.testing.tiny import make_tiny_components

GPU_SERIES = ("zimage_gpu_sm_clock_hertz", "zimage_gpu_temperature_celsius", "zimage_gpu_power_watts",
              "zimage_gpu_utilization_ratio", "zimage_gpu_memory_used_bytes", "zimage_gpu_other_processes",
              "zimage_gpu_throttle_seconds_total")


def post(url: str, body: dict, stream: bool = False):
    request = urllib.request.Request(url + "/v1/images/generations" + ("?stream=true" if stream else ""),
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def make_pipeline(args, log):
    device = torch.device(args.device)
    if args.tiny:
        if device.type == "cpu":
            torch.set_num_threads(1)  # tiny tensors: thread fan-out only adds contention
        pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), engine_dir=args.engine_dir,
                                                 device=device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, None
    engine_dir = args.engine_dir or tempfile.mkdtemp(prefix="zimage-serving-gpu-")
    build = None if args.eager or find_manifests(engine_dir) else [args.size]
    log(f"full-size random weights, {args.precision}, "
        + ("eager static denoiser" if args.eager else f"torch-compiled engine in {engine_dir}"
           + (" (building it now)" if build else " (already built)")))
    return full_size_pipeline(device, args.precision, None if args.eager else engine_dir, build)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="bench/results/serving_gpu", help="folder for serving_gpu.json and .log")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model instead of full-size random weights")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: 1024x1024, 256x256 with --tiny)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps")
    ap.add_argument("--images", type=int, default=16, help="images per phase")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16"), help="full-size model's engine precision")
    ap.add_argument("--eager", action="store_true", help="no engine: the eager static denoiser (full-size only)")
    ap.add_argument("--engine-dir", default=None,
                    help="engine folder: used if it holds engines, else built into (default: a temporary folder)")
    args = ap.parse_args()
    args.size = args.size or ("256x256" if args.tiny else "1024x1024")
    side_h, side_w = Resolution.parse(args.size).height, Resolution.parse(args.size).width  # size is WIDTHxHEIGHT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "serving_gpu.log")
    device = torch.device(args.device)
    started_all = time.perf_counter()
    pipe, build_s = make_pipeline(args, log)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "size": args.size, "steps": args.steps, "images": args.images,
                    "engine": "eager" if args.eager or args.tiny and not args.engine_dir else "torch-compiled",
                    "precision": args.precision if not args.tiny else str(pipe.dtype), "build_s": build_s,
                    "date": time.strftime("%Y-%m-%d"), "checks": {}}
    log(f"pipeline ready in {time.perf_counter() - started_all:.1f}s (build {build_s or 0:.1f}s) on {result['device']}")

    def direct(seed):
        return pipe(PROMPT_160, height=side_h, width=side_w, num_inference_steps=args.steps,
                    generator=torch.Generator(device).manual_seed(seed))

    for seed in range(2):  # warm: graphs, compiled kernels, allocator
        direct(seed)
    started = time.perf_counter()
    per_image = [direct(seed).timings.total_ms for seed in range(args.images)]
    direct_s = time.perf_counter() - started
    result["direct"] = {"images_per_s": args.images / direct_s, "per_image_ms": summarize(per_image)}
    log(f"direct: {result['direct']['images_per_s']:.3f} images/s, {summarize(per_image)['mean']:.1f} ms an image")

    service = ImageService(pipe, ServiceSettings(limits=ServingLimits(sizes=(args.size,)),
                                                 max_queue=max(64, args.images)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and service.ready):
        if service.state == "failed":
            raise SystemExit(f"service failed: {service.failure}")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"prompt": PROMPT_160, "size": args.size, "num_inference_steps": args.steps}

        def one(seed):
            sent = time.perf_counter()
            with post(url, {**body, "seed": seed}) as response:
                assert response.status == 200
                json.loads(response.read())  # the client's share of the work: read and parse the image
            return time.perf_counter() - sent

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.clients)))  # warm the HTTP path
            started = time.perf_counter()
            latencies = list(pool.map(one, range(args.images)))
        http_s = time.perf_counter() - started
        ratio = (args.images / http_s) / result["direct"]["images_per_s"]
        result["http"] = {"images_per_s": args.images / http_s, "clients": args.clients,
                          "client_latency_s": summarize(latencies), "ratio_to_direct": ratio}
        log(f"HTTP: {args.images / http_s:.3f} images/s with {args.clients} clients, {ratio:.3f} of direct "
            f"(target >= 0.97)")
        if device.type == "cuda":
            result["checks"]["http_throughput_within_3pct_of_direct"] = ratio >= 0.97

        arrivals = []
        with post(url, {**body, "seed": 99}, stream=True) as response:
            started = time.perf_counter()
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    arrivals.append((line.split(":", 1)[1].strip(), time.perf_counter() - started))
        steps = [t for name, t in arrivals if name == "step"]
        done = next(t for name, t in arrivals if name == "done")
        result["stream"] = {"events": [name for name, _ in arrivals], "first_step_s": steps[0], "last_step_s": steps[-1],
                            "done_s": done}
        # Not held back until the image is done (a buffered stream would deliver every event at `done`): the
        # first step's event well before the last event. (Against the last step's event, as before, two quick
        # tiny steps 8 ms apart after a 20 ms first one failed it on a CPU without any buffering.)
        result["checks"]["stream_steps_arrive_while_running"] = len(steps) == args.steps and steps[0] < 0.7 * done
        log(f"stream: {len(steps)} step events, first at {steps[0]:.3f}s, last {steps[-1]:.3f}s, done {done:.3f}s")

        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        with urllib.request.urlopen(url + "/v1/stats", timeout=30) as response:
            stats = json.loads(response.read())
        series = sorted({line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                         if line.startswith("zimage_gpu_")})
        result["telemetry"] = {"metrics": series, "stats_gpu": stats.get("gpu"), "gpu_sharing": stats.get("gpu_sharing")}
        log(f"NVML series in /metrics: {series or 'none'}")
        if device.type == "cuda":
            missing = [name for name in GPU_SERIES if name not in series]
            result["telemetry"]["missing"] = missing
            result["checks"]["nvml_series_in_metrics"] = not missing
            result["checks"]["gpu_sharing_in_stats"] = bool(stats.get("gpu_sharing"))
    finally:
        server.should_exit = True
        thread.join(60)
    result["total_s"] = time.perf_counter() - started_all
    text = json.dumps(result, indent=2)
    print(text)
    atomic_write_text(out / "serving_gpu.json", text + "\n")
    failed = [name for name, ok in result["checks"].items() if not ok]
    log(f"SERVING_GPU: {'PASS' if not failed else 'FAIL ' + ', '.join(failed)} in {result['total_s']:.0f}s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
