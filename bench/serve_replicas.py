"""Images per second of the Ray Serve deployment with 1 replica and with 2 (one GPU each), over HTTP.

Full-size Z-Image-Turbo architecture with random weights (the speed of the maths does not depend on
the values), 1024x1024, 8 steps, guidance 0, the ~160-token prompt; torch-compiled engines built once
(in a Ray task on one GPU, which then exits) into one folder that every replica loads, so no replica
compiles from scratch. Then: 1 replica, a warm-up round, a timed round of --images requests per
replica from --per-replica concurrent clients per replica; then the same with 2 replicas (a fresh
application: both replicas start at once, from the built engines); print images/s of each and the
ratio (target >= 1.9x).

    python bench/serve_replicas.py --json bench/results/serve_replicas.json     # 2 GPUs, ~5-8 min
    python bench/serve_replicas.py --tiny                                       # CPU smoke test

The driver never touches a GPU: only the replicas (and the build task) do.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

from zimage_trt.benchmark.common import PROMPT_160
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.serving import ray_deployment
from zimage_trt.serving.cluster_stats import REPORT_PERIOD_S


def build_full_size_engines(engine_dir: str, precision: str, side: int) -> float:
    """Runs in a Ray task on one GPU: the torch-compiled engine (and the VAE decoder's kernels)."""
    from zimage_trt.benchmark.common import full_size_transformer, full_size_vae
    from zimage_trt.compiler.build import build_engines
    from zimage_trt.model.precision import precision_dtype

    dtype = precision_dtype(precision)
    started = time.perf_counter()
    build_engines(full_size_transformer("cuda", dtype), [f"{side}x{side}"], engine_dir, backend="torch-compiled",
                  precision=precision, caption_capacity=512, batch=1, progress=False, vae=full_size_vae("cuda", dtype))
    return time.perf_counter() - started


def full_size_pipeline(engine_dir: str, precision: str):
    """Runs in each replica, on the GPU Ray gave it."""
    from zimage_trt.benchmark.common import full_size_components
    from zimage_trt.model.precision import precision_dtype
    from zimage_trt.pipeline import ZImageTRTPipeline

    dtype = precision_dtype(precision)
    return ZImageTRTPipeline.from_components(**full_size_components("cuda", dtype), engine_dir=engine_dir,
                                             device="cuda", torch_dtype=dtype, precision=precision)


class _Pipeline:
    """A picklable zero-argument factory (Ray sends it to each replica)."""

    def __init__(self, engine_dir: str, precision: str):
        self.engine_dir, self.precision = engine_dir, precision

    def __call__(self):
        return full_size_pipeline(self.engine_dir, self.precision)


def _versions() -> dict:
    """Versions and date, without touching CUDA here (benchmark.common.environment would open a context
    on GPU 0 in this driver process); the replicas report their GPU's name through /v1/stats."""
    import diffusers
    import ray
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> tuple[int, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            json.loads(response.read())  # the client's share of the work: read and parse the image
    except urllib.error.HTTPError as error:
        status = error.code
    return status, (time.perf_counter() - started) * 1000.0


def load_round(url: str, requests: int, clients: int, body: dict, timeout: float) -> dict:
    """`requests` generations from `clients` concurrent clients; wall time from first send to last answer."""
    lock = threading.Lock()
    next_seed, results = [0], []

    def client():
        while True:
            with lock:
                if next_seed[0] >= requests:
                    return
                seed = next_seed[0]
                next_seed[0] += 1
            results.append(_post(url, {**body, "seed": seed}, timeout))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [ms for status, ms in results if status == 200]
    return {"requests": requests, "clients": clients, "ok": len(ok), "statuses": sorted({s for s, _ in results}),
            "wall_s": wall, "images_per_s": len(ok) / wall, "latency_ms": summarize(ok)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--engine-dir", default="/tmp/zimage-serve-engines", help="where the engines are built (once)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16"), help="engine precision")
    ap.add_argument("--images", type=int, default=24, help="timed requests per replica count (one image each)")
    ap.add_argument("--per-replica", type=int, default=3,
                    help="concurrent clients per replica (> 1 keeps each GPU busy while a response travels)")
    ap.add_argument("--max-replicas", type=int, default=2, help="measure 1 .. this many replicas")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    ap.add_argument("--timeout", type=float, default=300.0, help="client time-out per request, seconds")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU replicas: a smoke test of this script")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    started = time.perf_counter()
    engine_dir = os.path.abspath(args.engine_dir)  # the replicas' working folder is not ours
    side = 256 if args.tiny else 1024
    results = {"env": _versions(), "args": vars(args), "size": f"{side}x{side}"}
    if args.tiny:
        ray.init(num_cpus=args.max_replicas, num_gpus=0, include_dashboard=False, object_store_memory=80 * 2**20)
    else:
        ray.init(include_dashboard=False, object_store_memory=2 * 2**30)  # images travel over HTTP, not the store
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < args.max_replicas:
            print(f"need {args.max_replicas} GPUs, Ray sees {gpus}", file=sys.stderr)
            return 2
    print(results["env"], f"Ray up in {time.perf_counter() - started:.1f}s", flush=True)

    pipeline = None
    serve_argv = ["--size", f"{side}x{side}", "--max-ongoing-requests", str(args.per_replica + 1),
                  "--max-queued-requests", "256", "--timeout", str(args.timeout)]
    if args.tiny:
        serve_argv += ["--tiny", "--device", "cpu"]
    else:
        build = ray.remote(num_gpus=1, max_calls=1)(build_full_size_engines)  # max_calls=1: its GPU is freed after
        results["build_s"] = ray.get(build.remote(engine_dir, args.precision, side))
        print(f"engines built once in {results['build_s']:.1f}s -> {engine_dir}", flush=True)
        pipeline = _Pipeline(engine_dir, args.precision)
        # The replicas make their pipeline with `pipeline`; --model only satisfies the serve options' check.
        serve_argv += ["--model", "random-full-size-weights", "--engine-dir", engine_dir, "--device", "cuda"]

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"prompt": PROMPT_160, "size": f"{side}x{side}", "num_inference_steps": args.steps}
    rounds = {}
    for replicas in range(1, args.max_replicas + 1):
        serve_args = ray_deployment._parser().parse_args(serve_argv + ["--replicas", str(replicas)])
        replica_args, options = ray_deployment.replica_resources(serve_args, 0 if args.tiny else 1)
        if replicas > 1:  # a fresh application: every replica starts at once from the built engines
            serve.delete(ray_deployment.APP_NAME)
        deploy_started = time.perf_counter()
        serve.run(ray_deployment.deployment(replica_args, options, pipeline=pipeline), name=ray_deployment.APP_NAME,
                  route_prefix="/")
        ready_s = time.perf_counter() - deploy_started
        clients = args.per_replica * replicas
        load_round(url, clients, clients, body, args.timeout)  # warm-up: every replica's first requests
        timed = load_round(url, args.images * replicas, clients, body, args.timeout)
        timed["replicas_ready_s"] = ready_s
        rounds[replicas] = timed
        lat = timed["latency_ms"]
        print(f"{replicas} replica(s): {timed['ok']}/{timed['requests']} images in {timed['wall_s']:.1f}s -> "
              f"{timed['images_per_s']:.3f} images/s; request latency p50 {lat['p50']:.0f} ms p95 {lat['p95']:.0f} ms "
              f"({clients} clients; replicas ready in {ready_s:.1f}s; statuses {timed['statuses']})", flush=True)
    time.sleep(1.5 * REPORT_PERIOD_S)  # every replica's last report is in
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=60).read())
    results["per_replica_completed"] = {r["replica"]: r["counts"]["completed"] for r in stats["replicas"]}
    results["gpus"] = [g.get("name") for g in stats.get("gpus", [])]
    print(f"replicas' GPUs (NVML): {results['gpus'] or 'none'}", flush=True)
    results["rounds"] = rounds
    if args.max_replicas >= 2:
        results["ratio"] = rounds[args.max_replicas]["images_per_s"] / rounds[1]["images_per_s"]
        print(f"{args.max_replicas} replicas / 1 replica: {results['ratio']:.2f}x images/s (target >= 1.9x); "
              f"completed per replica {results['per_replica_completed']}", flush=True)
    results["total_s"] = time.perf_counter() - started
    print(f"total {results['total_s']:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
