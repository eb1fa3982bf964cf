"""Images per second of the Ray Serve deployment in several layouts of replicas x GPUs, over HTTP.

Full-size Z-Image-Turbo architecture with random weights (the speed of the maths does not depend on
the values), 1024x1024, 8 steps, guidance 0, the ~160-token prompt; torch-compiled engines built once
(in a Ray task on one GPU, which then exits) into one folder that every replica loads, so no replica
compiles the one-GPU graphs from scratch (a sequence-parallel replica compiles its own at warm-up).
Each layout `RxD` is R replicas of D GPUs (`--sequence-parallel D`), a fresh application: a warm-up
round, then a timed round of --images requests per replica from --per-replica concurrent clients per
replica; printed: images/s, request latency, and the ratio of each layout to the first.

    python bench/serve_replicas.py --json bench/results/serve_replicas.json     # 1x1, 2x1: 2 GPUs, ~5-8 min
    python bench/serve_replicas.py --layouts 1x1,4x1,2x2 --json $OUT/serve_layouts.json   # 4 GPUs
    python bench/serve_replicas.py --layouts 1x1,4x1,2x2 --kill-mid-load ...   # + one replica killed
    python bench/serve_replicas.py --tiny                                       # CPU smoke test

`--kill-mid-load`: in the last layout's timed round, one replica (for D > 1: its rank 1, the whole
group fails) is killed once the load runs; recorded: the statuses (its in-flight requests 500, the
rest 200: nothing lost or hung), and the seconds until Serve has the layout's replicas running again.

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


def full_size_pipeline(engine_dir: str, precision: str, sequence_parallel: int = 1):
    """Runs in each replica (and each rank of a sequence-parallel replica), on the GPU Ray gave it."""
    from zimage_trt.benchmark.common import full_size_components
    from zimage_trt.model.precision import precision_dtype
    from zimage_trt.pipeline import ZImageTRTPipeline

    dtype = precision_dtype(precision)
    return ZImageTRTPipeline.from_components(**full_size_components("cuda", dtype), engine_dir=engine_dir,
                                             device="cuda", torch_dtype=dtype, precision=precision,
                                             sequence_parallel=sequence_parallel)


class _Pipeline:
    """A picklable zero-argument factory (Ray sends it to each replica and rank)."""

    def __init__(self, engine_dir: str, precision: str, sequence_parallel: int = 1):
        self.engine_dir, self.precision, self.sequence_parallel = engine_dir, precision, sequence_parallel

    def __call__(self):
        return full_size_pipeline(self.engine_dir, self.precision, self.sequence_parallel)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'1x1,4x1,2x2' -> [(replicas, gpus each), ...]."""
    layouts = []
    for item in text.split(","):
        replicas, _, degree = item.strip().lower().partition("x")
        layouts.append((int(replicas), int(degree or 1)))
    return layouts


def kill_one_replica(app: str, deployment: str, board, degree: int) -> dict:
    """Kill a replica that is running a request (for degree > 1 its rank 1); what was killed and when."""
    import ray

    from zimage_trt.serving.ray_ranks import RANK_NAMESPACE

    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        busy = [r for r, _, stats, _ in ray.get(board.collect.remote(5.0)) if stats["queue"]["running"]]
        if busy:
            break
        time.sleep(0.1)
    else:
        return {"killed": None}
    if degree > 1:
        actor = ray.get_actor(f"{app}#{busy[0]}:rank1", namespace=RANK_NAMESPACE)
    else:
        actor = ray.get_actor(f"SERVE_REPLICA::{app}#{deployment}#{busy[0]}", namespace="serve")
    ray.kill(actor, no_restart=True)
    return {"killed": busy[0], "rank": 1 if degree > 1 else 0, "at": time.perf_counter()}


def running_again(board, killed: str, replicas: int, since: float, within_s: float = 600.0) -> float | None:
    """Seconds from `since` until `replicas` replicas, none of them the killed one, report ready (a
    replica reports only once it has loaded and warmed)."""
    import ray

    deadline = time.perf_counter() + within_s
    while time.perf_counter() < deadline:
        reports = ray.get(board.collect.remote(3.0))
        ready = [r for r, _, stats, _ in reports if stats.get("state") == "ready"]
        if killed not in ready and len(ready) == replicas:
            return time.perf_counter() - since
        time.sleep(0.5)
    return None


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


def load_round(url: str, requests: int, clients: int, body: dict, timeout: float, during=None) -> dict:
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
    event = during() if during is not None else None  # e.g. kill a replica while the clients run
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [ms for status, ms in results if status == 200]
    counts = {str(code): sum(1 for status, _ in results if status == code) for code in sorted({s for s, _ in results})}
    return {"requests": requests, "clients": clients, "ok": len(ok), "statuses": sorted({s for s, _ in results}),
            "status_counts": counts, "answered": len(results), "wall_s": wall, "images_per_s": len(ok) / wall,
            "latency_ms": summarize(ok), **({"event": event} if event is not None else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--engine-dir", default="/tmp/zimage-serve-engines", help="where the engines are built (once)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16"), help="engine precision")
    ap.add_argument("--images", type=int, default=24, help="timed requests per replica count (one image each)")
    ap.add_argument("--per-replica", type=int, default=3,
                    help="concurrent clients per replica (> 1 keeps each GPU busy while a response travels)")
    ap.add_argument("--max-replicas", type=int, default=2, help="measure 1 .. this many replicas (without --layouts)")
    ap.add_argument("--layouts", default=None,
                    help="REPLICASxGPUS layouts to measure in turn, e.g. 1x1,4x1,2x2 (2x2: 2 replicas of 2 GPUs, "
                         "sequence-parallel); default: 1x1 .. MAXx1 from --max-replicas")
    ap.add_argument("--kill-mid-load", action="store_true",
                    help="kill one replica during the last layout's timed round and record what happened")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    ap.add_argument("--timeout", type=float, default=300.0, help="client time-out per request, seconds")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU replicas: a smoke test of this script")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    started = time.perf_counter()
    layouts = parse_layouts(args.layouts) if args.layouts else [(r, 1) for r in range(1, args.max_replicas + 1)]
    gpus_needed = max(r * d for r, d in layouts)
    engine_dir = os.path.abspath(args.engine_dir)  # the replicas' working folder is not ours
    side = 256 if args.tiny else 1024
    results = {"env": _versions(), "args": vars(args), "size": f"{side}x{side}"}
    if args.tiny:
        ray.init(num_cpus=gpus_needed, num_gpus=0, include_dashboard=False, object_store_memory=80 * 2**20)
    else:
        ray.init(include_dashboard=False, object_store_memory=2 * 2**30)  # images travel over HTTP, not the store
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < gpus_needed:
            print(f"need {gpus_needed} GPUs for {layouts}, Ray sees {gpus}", file=sys.stderr)
            return 2
    print(results["env"], f"Ray up in {time.perf_counter() - started:.1f}s", flush=True)

    serve_argv = ["--size", f"{side}x{side}", "--max-ongoing-requests", str(args.per_replica + 1),
                  "--max-queued-requests", "256", "--timeout", str(args.timeout)]
    if args.tiny:
        serve_argv += ["--tiny", "--device", "cpu"]
    else:
        build = ray.remote(num_gpus=1, max_calls=1)(build_full_size_engines)  # max_calls=1: its GPU is freed after
        results["build_s"] = ray.get(build.remote(engine_dir, args.precision, side))
        print(f"engines built once in {results['build_s']:.1f}s -> {engine_dir}", flush=True)
        # The replicas make their pipeline with `_Pipeline`; --model only satisfies the serve options' check.
        serve_argv += ["--model", "random-full-size-weights", "--engine-dir", engine_dir, "--device", "cuda"]

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"prompt": PROMPT_160, "size": f"{side}x{side}", "num_inference_steps": args.steps}
    rounds = {}
    for n, (replicas, degree) in enumerate(layouts):
        layout = f"{replicas}x{degree}"
        serve_args = ray_deployment._parser().parse_args(serve_argv + ["--replicas", str(replicas),
                                                                      "--sequence-parallel", str(degree)])
        replica_args, options = ray_deployment.replica_resources(serve_args, 0 if args.tiny else 1)
        if n:  # a fresh application: every replica starts at once from the built engines
            serve.delete(ray_deployment.APP_NAME)
        pipeline = None if args.tiny else _Pipeline(engine_dir, args.precision, degree)
        deploy_started = time.perf_counter()
        serve.run(ray_deployment.deployment(replica_args, options, pipeline=pipeline), name=ray_deployment.APP_NAME,
                  route_prefix="/")
        ready_s = time.perf_counter() - deploy_started
        clients = args.per_replica * replicas
        load_round(url, clients, clients, body, args.timeout)  # warm-up: every replica's first requests
        during = None
        if args.kill_mid_load and n == len(layouts) - 1:
            board = ray.get_actor(f"stats:{ray_deployment.APP_NAME}", namespace=ray_deployment.BOARD_NAMESPACE)

            def during(replicas=replicas, degree=degree, board=board):
                event = kill_one_replica(ray_deployment.APP_NAME, ray_deployment.DEPLOYMENT_NAME, board, degree)
                return event
        timed = load_round(url, args.images * replicas, clients, body, args.timeout, during=during)
        if "event" in timed and timed["event"].get("at"):
            timed["event"]["running_again_s"] = running_again(board, timed["event"]["killed"], replicas,
                                                              timed["event"].pop("at"))
        timed["replicas_ready_s"] = ready_s
        timed["gpus"] = replicas * degree
        rounds[layout] = timed
        lat = timed["latency_ms"]
        print(f"{layout} ({replicas} replica(s) of {degree} GPU(s)): {timed['ok']}/{timed['requests']} images in "
              f"{timed['wall_s']:.1f}s -> {timed['images_per_s']:.3f} images/s; request latency p50 {lat['p50']:.0f} ms "
              f"p95 {lat['p95']:.0f} ms ({clients} clients; replicas ready in {ready_s:.1f}s; statuses "
              f"{timed['status_counts']})", flush=True)
        if "event" in timed:
            print(f"  killed mid-load: {timed['event']}; answered {timed['answered']}/{timed['requests']}", flush=True)
    time.sleep(1.5 * REPORT_PERIOD_S)  # every replica's last report is in
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=60).read())
    results["per_replica_completed"] = {r["replica"]: r["counts"]["completed"] for r in stats["replicas"]}
    results["gpus"] = [g.get("name") for g in stats.get("gpus", [])]
    print(f"replicas' GPUs (NVML): {results['gpus'] or 'none'}", flush=True)
    results["rounds"] = rounds
    first = f"{layouts[0][0]}x{layouts[0][1]}"
    results["ratios"] = {layout: r["images_per_s"] / rounds[first]["images_per_s"] for layout, r in rounds.items()}
    for layout, ratio in results["ratios"].items():
        print(f"{layout} / {first}: {ratio:.2f}x images/s, latency p50 "
              f"{rounds[layout]['latency_ms']['p50'] / rounds[first]['latency_ms']['p50']:.2f}x", flush=True)
    if [tuple(x) for x in layouts[:2]] == [(1, 1), (2, 1)]:  # (the figure issue 13 set a target for)
        results["ratio"] = results["ratios"]["2x1"]
        print(f"2 replicas / 1 replica: {results['ratio']:.2f}x images/s (target >= 1.9x); "
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
