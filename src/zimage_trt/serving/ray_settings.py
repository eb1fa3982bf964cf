"""`zimage-trt serve --ray`'s options (the standard library only, like `settings.py`, so that the CLI's
parser is built without Ray installed). What they do: `ray_deployment.py`."""

from __future__ import annotations

import argparse

from .settings import ServeConfigError


def add_ray_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("many GPUs with Ray Serve (needs the ray extra)")
    group.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve, one replica per GPU, the same HTTP API")
    group.add_argument("--replicas", type=int, default=1,
                       help="replicas (with --ray): one GPU each (N with --sequence-parallel N), or CPU replicas "
                            "with --device cpu")
    group.add_argument("--max-ongoing-requests", type=int, default=4,
                       help="requests one replica holds at once (one runs, the rest wait in its queue)")
    group.add_argument("--max-queued-requests", type=int, default=64,
                       help="requests waiting in Ray Serve's proxy for a free replica; more are answered 429 "
                            "with Retry-After")
    group.add_argument("--health-check-period", type=float, default=5.0,
                       help="seconds between Ray Serve's health checks of a replica")
    group.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPU cores Ray reserves for each replica (for each of its processes with "
                            "--sequence-parallel)")
    group.add_argument("--autoscale", default=None, metavar="MIN,MAX",
                       help="let Ray Serve add replicas under load and remove them when idle, between MIN and MAX "
                            "(instead of --replicas; MIN 0 scales to zero: the first request then waits for a "
                            "replica to load and warm) (default: a fixed --replicas)")
    group.add_argument("--target-ongoing-requests", type=float, default=2.0,
                       help="with --autoscale: the requests (running + waiting in its queue) per replica that Serve "
                            "scales towards; 2 keeps a GPU busy while the next request waits; at most "
                            "--max-ongoing-requests")
    group.add_argument("--upscale-delay", type=float, default=30.0,
                       help="with --autoscale: seconds the load must stay above the target before a replica is added")
    group.add_argument("--downscale-delay", type=float, default=600.0,
                       help="with --autoscale: seconds the load must stay below the target before a replica is "
                            "removed (it finishes what it holds first)")
    group.add_argument("--autoscale-look-back", type=float, default=30.0,
                       help="with --autoscale: seconds over which the requests per replica are averaged")
    group.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster to join (e.g. auto, or ray://HOST:10001); "
                            "default: start one on this machine")


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """--autoscale MIN,MAX as (min, max), or None when not given; a ServeConfigError saying what is wrong."""
    if text is None:
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise ServeConfigError(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4") from None
    if not 0 <= low <= high or high < 1:
        raise ServeConfigError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1, e.g. 1,4")
    return low, high
