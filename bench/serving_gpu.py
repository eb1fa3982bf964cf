"""The one-GPU service on a GPU: what HTTP costs over calling the pipeline, and the GPU readings.

    python bench/serving_gpu.py                      # full-size random weights, bf16, eager, 1024x1024, cuda
    python bench/serving_gpu.py --tiny --device cpu  # the same flow on the tiny model (checks the script)

1. direct: `--images` images back to back through `pipe(...)`: images/s and per-image ms;
2. HTTP: the same number of requests through the app under uvicorn on loopback, from `--clients`
   concurrent clients: images/s, client latency p50/p95, and the ratio to direct (target >= 0.97);
3. streaming: the step events of one `?stream=true` request arrive while it runs (not all at the end);
4. telemetry: /metrics has the NVML series (SM clock, temperature, power, utilisation, memory) and
   /v1/stats the GPU readings.

Prints one JSON object (also written to --out) and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn

from zimage_trt.model.shapes import Resolution
from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.serving.app import create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.testing.tiny import make_tiny_components


def post(url: str, body: dict, stream: bool = False):
    request = urllib.request.Request(url + "/v1/images/generations" + ("?stream=true" if stream else ""),
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model instead of full-size random weights")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: 1024x1024, 256x256 with --tiny)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps")
    ap.add_argument("--images", type=int, default=24, help="images per phase")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--engine-dir", default=None, help="built engines (default: the eager static denoiser)")
    ap.add_argument("--out", default="bench/results/serving_gpu.json", help="JSON result file")
    args = ap.parse_args()
    size = args.size or ("256x256" if args.tiny else "1024x1024")
    height, width = Resolution.parse(size).height, Resolution.parse(size).width  # size is WIDTHxHEIGHT
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: thread fan-out only adds contention
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        parts = make_tiny_components(seed=0)
    else:
        from zimage_trt.benchmark.common import full_size_components

        parts = full_size_components(device, dtype)
    pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=args.engine_dir, device=device, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "size": size, "steps": args.steps, "images": args.images,
                    "date": time.strftime("%Y-%m-%d"), "checks": {}}

    def direct(seed):
        return pipe("a red fox in the snow", height=height, width=width, num_inference_steps=args.steps,
                    generator=torch.Generator(device).manual_seed(seed))

    for seed in range(2):  # warm: graphs, compiled kernels, allocator
        direct(seed)
    started = time.perf_counter()
    per_image = [direct(seed).timings.total_ms for seed in range(args.images)]
    direct_s = time.perf_counter() - started
    result["direct"] = {"images_per_s": args.images / direct_s, "per_image_ms": summarize(per_image)}

    service = ImageService(pipe, ServiceSettings(limits=ServingLimits(sizes=(size,)), max_queue=max(64, args.images)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and service.ready):
        if service.state == "failed":
            raise SystemExit(f"service failed: {service.failure}")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"prompt": "a red fox in the snow", "size": size, "num_inference_steps": args.steps}

        def one(seed):
            sent = time.perf_counter()
            with post(url, {**body, "seed": seed}) as response:
                assert response.status == 200
                response.read()
            return time.perf_counter() - sent

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.clients)))  # warm the HTTP path
            started = time.perf_counter()
            latencies = list(pool.map(one, range(args.images)))
        http_s = time.perf_counter() - started
        ratio = (args.images / http_s) / result["direct"]["images_per_s"]
        result["http"] = {"images_per_s": args.images / http_s, "clients": args.clients,
                          "client_latency_s": summarize(latencies), "ratio_to_direct": ratio}
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
        result["checks"]["stream_steps_arrive_while_running"] = len(steps) == args.steps and steps[0] < 0.7 * steps[-1]

        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        with urllib.request.urlopen(url + "/v1/stats", timeout=30) as response:
            stats = json.loads(response.read())
        gpu_series = sorted({line.split("{")[0] for line in metrics.splitlines() if line.startswith("zimage_gpu_")})
        result["telemetry"] = {"metrics": gpu_series, "stats_gpu": stats.get("gpu")}
        if device.type == "cuda":
            result["checks"]["nvml_series_in_metrics"] = len(gpu_series) >= 4
    finally:
        server.should_exit = True
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as out:
        out.write(text + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
