"""`zimage-trt serve --ray`'s options (the standard library only, like `settings.py`, so that the CLI's
parser is built without Ray installed). What they do: `ray_deployment.py`."""

from __future__ import annotations

import argparse


def add_ray_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("many GPUs with Ray Serve (needs the ray extra)")
    group.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve, one replica per GPU, the same HTTP API")
    group.add_argument("--replicas", type=int, default=1,
                       help="replicas (with --ray): one GPU each, or one CPU each with --device cpu")
    group.add_argument("--max-ongoing-requests", type=int, default=4,
                       help="requests one replica holds at once (one runs, the rest wait in its queue)")
    group.add_argument("--max-queued-requests", type=int, default=64,
                       help="requests waiting in Ray Serve's proxy for a free replica; more are answered 429 "
                            "with Retry-After")
    group.add_argument("--health-check-period", type=float, default=5.0,
                       help="seconds between Ray Serve's health checks of a replica")
    group.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPU cores Ray reserves for each replica")
    group.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster to join (e.g. auto, or ray://HOST:10001); "
                            "default: start one on this machine")
