"""Ray Serve: the `zimage-trt serve` HTTP service on many GPUs (and machines), one replica per GPU.

    zimage-trt serve --ray --replicas 2 --model DIR --engine-dir engines/     # this machine's GPUs
    serve run docs/ray-serve.yaml                                            # a Ray Serve config file
    serve run zimage_trt.serving.ray_deployment:app_builder model=DIR engine_dir=engines/ replicas=2

Each replica is one `ImageService` (one pipeline and its queue) behind the same FastAPI app as the
one-GPU server (`create_app`), so the HTTP API is unchanged; Ray Serve's proxy spreads the requests.
- Ray gives each replica one GPU (`num_gpus=1`, `--device cpu`: CPU replicas). A replica gets requests
  only once it has loaded and warmed every served size (its constructor waits for that).
- `--sequence-parallel N`: each replica is a group of N GPUs on one node making each image together
  (a placement group of N bundles; its ranks 1..N-1 are actors it starts: `ray_ranks.py`), so a 4-GPU
  host serves 2 replicas x 2 GPUs behind the same proxy.
- `--autoscale MIN,MAX`: Serve's autoscaler adds replicas while the requests per replica stay above
  `--target-ongoing-requests` and removes them when idle; a new replica gets requests only once warm, a
  removed one first finishes every request it holds (graceful shutdown, then `__del__`).
- Backpressure is Ray Serve's: a replica holds at most `max_ongoing_requests` requests (one runs, the
  others wait in its queue); at most `max_queued_requests` more wait in the proxy for a free replica;
  beyond that the proxy answers 429 with Retry-After at once (as the one-GPU server does when full).
- A replica that dies (process killed, GPU lost): the proxy answers its in-flight requests 500 at
  once (none hangs), routes the others to the live replicas, and Serve's controller starts a new one.
- `/v1/stats` and `/metrics` cover every replica (`cluster_stats.py`: each replica reports to a small
  stats actor once a second).
- Security as for one GPU: the proxy listens on loopback unless an API key is set, and then only loopback
  host names are answered (`settings.allowed_host_names`); replicas read the key from `--api-key-file` or
  $ZIMAGE_TRT_API_KEY on their own machine (it never travels through Ray).

Needs `pip install zimage_trt[ray]`; `ray` is imported only here, where used.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import signal
import threading

from .cluster_stats import REPORT_PERIOD_S, STALE_AFTER_S, StatsBoard, merge_metrics, merge_stats
from .command import build_service, pipeline_factory, serving_app
from .metrics import ServiceMetrics
from .ray_ranks import ReplicaRanks, rank_bundle
from .ray_settings import add_ray_arguments, parse_autoscale
from .service import ImageService
from .settings import DEFAULT_HOST, ServeConfigError, add_arguments, check_bind, is_loopback, read_api_key

log = logging.getLogger("zimage_trt.serving")

APP_NAME = "zimage-trt"
DEPLOYMENT_NAME = "ImageReplica"
BOARD_NAMESPACE = "zimage-trt"
BACKPRESSURE_RETRY_AFTER_S = 5.0  # about a few images' time on one GPU
BOARD_TIMEOUT_S = 10.0


# -- one replica -----------------------------------------------------------------------------------
class _Reporter:
    """Sends this replica's stats to the board every `REPORT_PERIOD_S`, and reads everyone's back."""

    def __init__(self, app_name: str, replica: str):
        self.app_name, self.replica = app_name, replica
        self.board = board_actor(app_name)
        self.service: "ClusterImageService | None" = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zimage-trt-stats-report", daemon=True)

    def start(self, service: "ClusterImageService") -> None:
        self.service = service
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # leave the board at once rather than after STALE_AFTER_S
            self.board.remove.remote(self.replica)
        except Exception:  # noqa: BLE001 - Ray already shut down: nothing left to tell
            pass

    def _report(self):
        service = self.service
        return self.board.put.remote(self.replica, service.own_stats(), service.metrics.own_text().decode())

    def _reconnect(self) -> None:
        """A new board if the old one died (its node went away, or someone killed it); reports refill it."""
        try:
            self.board = board_actor(self.app_name)
        except Exception:  # noqa: BLE001 - Ray itself is going away: the next report tries again
            log.warning("replica %s could not reach the stats board", self.replica, exc_info=True)

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                ray.get(self._report(), timeout=BOARD_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - one lost report is harmless; the next comes in a second
                log.warning("replica %s could not report its stats", self.replica, exc_info=True)
                self._reconnect()

    def collect(self) -> list[tuple[str, float, dict, str]]:
        """Every live replica's report, this one's fresh (called in a worker thread: ray.get blocks)."""
        import ray

        try:  # bounded: a board that does not answer must not hang /v1/stats
            ray.get(self._report(), timeout=BOARD_TIMEOUT_S)
            return ray.get(self.board.collect.remote(STALE_AFTER_S), timeout=BOARD_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the board is gone or stuck: answer with this replica alone
            log.warning("stats board unreachable; answering with replica %s alone", self.replica, exc_info=True)
            self._reconnect()
            service = self.service
            return [(self.replica, 0.0, service.own_stats(), service.metrics.own_text().decode())]


class _ClusterMetrics(ServiceMetrics):
    """This replica's metrics; `render` (what /metrics answers) gives every replica's, labelled."""

    def __init__(self, reporter: _Reporter):
        super().__init__()
        self._reporter = reporter

    def own_text(self) -> bytes:
        return super().render()

    def render(self) -> bytes:
        return merge_metrics([(replica, text) for replica, _, _, text in self._reporter.collect()])


class ClusterImageService(ImageService):
    """An `ImageService` whose `stats()` (what /v1/stats answers) covers every replica of the deployment."""

    def __init__(self, pipeline, settings, reporter: _Reporter):
        super().__init__(pipeline, settings, metrics=_ClusterMetrics(reporter))
        self._reporter = reporter

    def own_stats(self) -> dict:
        stats = super().stats()
        stats["sequence_parallel"] = getattr(getattr(self.pipe, "options", None), "sequence_parallel", 1)
        return stats

    def stats(self) -> dict:
        return merge_stats([(replica, age, stats) for replica, age, stats, _ in self._reporter.collect()])

    def close(self, graceful: bool = True, timeout: float | None = None) -> None:
        self._reporter.stop()
        super().close(graceful, timeout)


def board_actor(app_name: str):
    """The application's stats board: a detached actor (it outlives any one replica), made once."""
    import ray

    # "DEFAULT" scheduling: outside the placement group of the replica that makes it (a sequence-parallel
    # replica's, which Serve removes with that replica, and every actor in it).
    return ray.remote(num_cpus=0)(StatsBoard).options(
        name=f"stats:{app_name}", namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy="DEFAULT").remote()


def _proxy_host() -> str | None:
    """The address Serve's HTTP proxies listen on (None where this Ray version does not say)."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception:  # noqa: BLE001 - a private API: the command line checked the address already
        log.warning("could not read Serve's HTTP address to check the API-key rule", exc_info=True)
        return None


class ImageReplica:
    """One Serve replica: load and warm one pipeline, then serve `create_app`'s API over it."""

    async def __init__(self, args: argparse.Namespace, app_name: str = APP_NAME, pipeline=None):
        """`pipeline`: a zero-argument function that makes the pipeline here, in the replica (e.g. other
        weights, or LoRA); by default it is loaded from `args` as `zimage-trt serve` does."""
        from ray import serve

        self.replica = serve.get_replica_context().replica_tag
        self._closed = False
        self.api_key = read_api_key(args.api_key_file)
        host = await asyncio.to_thread(_proxy_host)
        if host is not None and self.api_key is None and not is_loopback(host):
            check_bind(host, None)  # raises: the same refusal as the one-GPU server's
        self.host = host or DEFAULT_HOST  # (unread: keyless, the loopback names only)
        reporter = _Reporter(app_name, self.replica)
        base = build_service(args)  # the checked sizes and limits; its pipeline is never loaded
        self.ranks = None
        if args.sequence_parallel > 1:  # ranks 1..N-1 start in this replica's placement group; all join one group
            self.ranks = ReplicaRanks(args, pipeline, name=f"{app_name}#{self.replica}")
            await self.ranks.while_watching(asyncio.to_thread(self.ranks.join))
        self.service = ClusterImageService(pipeline or pipeline_factory(args), base.settings, reporter)
        # Load and warm here, in a thread: Serve routes nothing to a replica before its constructor returns.
        loading = asyncio.to_thread(self.service.start, False)
        await (self.ranks.while_watching(loading) if self.ranks is not None else loading)
        if not self.service.ready:
            raise RuntimeError(f"replica {self.replica} could not load and warm its pipeline: {self.service.failure}")
        reporter.start(self.service)
        if self.ranks is not None:
            self.ranks.watch(self.service)
        log.info("replica %s ready on %s%s", self.replica, self.service.pipe.device,
                 f" with {args.sequence_parallel - 1} more rank(s)" if self.ranks is not None else "")

    def __serve_build_asgi_app__(self):
        # The one-GPU server's app and host rule; no links (response_format "url"): the proxy may send the
        # link's GET to another replica.
        return serving_app(self.service, self.api_key, self.host, url_max_images=0)

    def check_health(self) -> None:
        """Serve's periodic health check: a failed or stopped service, or a rank of its group that ended,
        gets this replica replaced (its rank actors end with it)."""
        if self.service.state in ("failed", "stopped"):
            raise RuntimeError(f"replica {self.replica} is {self.service.state}")
        reason = self.ranks.failure() if self.ranks is not None else None
        if reason is not None:
            raise RuntimeError(f"replica {self.replica}: {reason}")

    def __del__(self):
        """Serve's graceful stop, once the replica holds no request: close the service (and its pipeline,
        which releases the other ranks), then end the rank actors. (Once: the garbage collector may call it
        again.)"""
        if getattr(self, "_closed", True):  # (a constructor that failed early has nothing to close)
            return
        self._closed = True
        service, ranks = getattr(self, "service", None), getattr(self, "ranks", None)
        if ranks is not None:
            ranks.closing()
        if service is not None:
            service.close(True)
        if ranks is not None:
            ranks.close()


# -- the deployment ----------------------------------------------------------------------------------
def replica_resources(args: argparse.Namespace, cluster_gpus: float | None = None) -> tuple[argparse.Namespace, dict]:
    """(args for the replicas, their `ray_actor_options`): one GPU each, or CPU replicas for `--device cpu`.

    Ray picks each replica's GPU (it sets CUDA_VISIBLE_DEVICES), so a replica's device is plain "cuda".
    With no --device, replicas use GPUs when the cluster has any (`cluster_gpus`), else the CPU.
    """
    device = args.device
    if device is not None and device.startswith("cuda:"):
        raise ServeConfigError(f"--device {device}: under --ray, Ray gives each replica its own GPU; "
                               f"pass --device cuda (or leave it out)")
    if device is None:
        device = "cuda" if cluster_gpus else "cpu"
    if device not in ("cuda", "cpu"):
        raise ServeConfigError(f"--device {device!r}: under --ray a replica runs on 'cuda' (one GPU each) or 'cpu'")
    replica_args = copy.copy(args)
    replica_args.device = device
    options = {"num_cpus": args.cpus_per_replica}
    if device == "cuda":
        options["num_gpus"] = 1
    return replica_args, options


def replica_placement(args: argparse.Namespace) -> dict:
    """The deployment's placement-group options: with --sequence-parallel N, N bundles on one node (the
    replica in the first, its other ranks in the rest); nothing for one process per replica."""
    if args.sequence_parallel == 1:
        return {}
    if args.sequence_parallel < 1:
        raise ServeConfigError(f"--sequence-parallel must be >= 1, got {args.sequence_parallel}")
    return {"placement_group_bundles": [rank_bundle(args) for _ in range(args.sequence_parallel)],
            "placement_group_strategy": "STRICT_PACK"}


def scaling(args: argparse.Namespace) -> dict:
    """`num_replicas`, or with --autoscale Serve's `autoscaling_config` (the options' values, checked)."""
    bounds = parse_autoscale(args.autoscale)
    if bounds is None:
        return {"num_replicas": args.replicas}
    if not 0 < args.target_ongoing_requests <= args.max_ongoing_requests:
        raise ServeConfigError(
            f"--target-ongoing-requests {args.target_ongoing_requests:g} must be > 0 and at most "
            f"--max-ongoing-requests ({args.max_ongoing_requests}): a replica never holds more, so it would never scale")
    if min(args.upscale_delay, args.downscale_delay) < 0 or args.autoscale_look_back <= 0:
        raise ServeConfigError("--upscale-delay and --downscale-delay must be >= 0 and --autoscale-look-back > 0")
    return {"autoscaling_config": {
        "min_replicas": bounds[0], "max_replicas": bounds[1], "target_ongoing_requests": args.target_ongoing_requests,
        "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay,
        "look_back_period_s": args.autoscale_look_back}}


def deployment(args: argparse.Namespace, ray_actor_options: dict, app_name: str = APP_NAME, pipeline=None):
    """The bound Serve application: `args.replicas` replicas (or --autoscale's range) of `ImageReplica` over
    `args` (and `pipeline`, a picklable zero-argument function making each replica's pipeline, when given;
    with --sequence-parallel N it runs on every rank and must pass sequence_parallel=N)."""
    from ray import serve

    if args.replicas < 1 or args.max_ongoing_requests < 1 or args.max_queued_requests < 1:
        raise ServeConfigError(f"--replicas, --max-ongoing-requests and --max-queued-requests must be >= 1, got "
                               f"{args.replicas}, {args.max_ongoing_requests}, {args.max_queued_requests}")
    replica = serve.deployment(
        serve.ingress()(ImageReplica),
        name=DEPLOYMENT_NAME,
        **scaling(args),
        **replica_placement(args),
        ray_actor_options=ray_actor_options,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        # Over max_queued_requests: 429 with Retry-After, as the one-GPU server answers a full queue.
        backpressure_config={"status_code": 429, "retry_after_s": BACKPRESSURE_RETRY_AFTER_S},
        health_check_period_s=args.health_check_period,
        health_check_timeout_s=max(30.0, 3 * args.health_check_period),
        # A stopping replica first finishes what it holds (the running request at most `timeout`).
        graceful_shutdown_timeout_s=args.timeout + 30.0,
    )
    return replica.bind(args, app_name, pipeline)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zimage_trt.serving.ray_deployment:app_builder", add_help=False)
    add_arguments(ap)
    add_ray_arguments(ap)
    return ap


def config_arguments(config: dict) -> argparse.Namespace:
    """A Serve config's `args:` as `zimage-trt serve`'s options, parsed and checked as the command line's."""
    ap = _parser()
    known = {action.dest: action for action in ap._actions}
    argv = []
    for key, value in dict(config or {}).items():
        action = known.get(key)
        if action is None or key in ("ray", "ray_address", "host", "port"):
            raise ServeConfigError(f"unknown argument {key!r} for the zimage-trt Serve application; known: "
                                   f"{sorted(k for k in known if k not in ('ray', 'ray_address', 'host', 'port'))} "
                                   f"(the address and port are the config's http_options)")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch
            if str(value).lower() in ("1", "true", "yes"):
                argv.append(flag)
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    try:
        return ap.parse_args(argv)
    except SystemExit:
        raise ServeConfigError(f"invalid arguments for the zimage-trt Serve application: {config}") from None


def app_builder(config: dict):
    """Ray Serve's application builder (`serve run ...:app_builder key=value ...`, or a config file's
    `import_path` with `args:`). Keys are `zimage-trt serve`'s options with underscores ("engine_dir",
    "replicas", "max_ongoing_requests", ...); they are checked as the command line checks them."""
    args = config_arguments(config)
    build_service(args)  # the same checks as `zimage-trt serve`, before any replica starts
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else (0 if args.device == "cpu" else 1)
    replica_args, options = replica_resources(args, gpus)
    return deployment(replica_args, options)


# -- `zimage-trt serve --ray` ------------------------------------------------------------------------
def run_ray_server(args: argparse.Namespace) -> int:
    """Start (or join, with --ray-address) a Ray cluster, deploy the replicas, serve until SIGINT/SIGTERM."""
    api_key = read_api_key(args.api_key_file)
    check_bind(args.host, api_key)  # before anything starts: a refusal is immediate
    build_service(args)  # bad sizes or limits are refused before Ray starts too
    scaling(args)  # and a bad --autoscale
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray
    from ray import serve

    ray.init(address=args.ray_address, include_dashboard=False)
    try:
        replica_args, options = replica_resources(args, ray.cluster_resources().get("GPU", 0))
        serve.start(http_options={"host": args.host, "port": args.port})
        count = f"{args.replicas}" if args.autoscale is None else f"{args.autoscale.replace(',', ' to ')} (autoscaled)"
        group = f", {args.sequence_parallel} processes each" if args.sequence_parallel > 1 else ""
        log.info("starting %s replica(s) (%s%s); each loads and warms before it serves", count, options, group)
        serve.run(deployment(replica_args, options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d with %s replica(s) (%s)", args.host, args.port, count,
                 "API key required" if api_key else "no API key")
        _wait_for_signal()
        log.info("shutting down: replicas finish their running requests")
        serve.delete(APP_NAME)
        try:
            ray.kill(ray.get_actor(f"stats:{APP_NAME}", namespace=BOARD_NAMESPACE))
        except ValueError:  # no replica ever made it
            pass
    finally:
        if args.ray_address is None:  # our own local cluster: stop it; a shared cluster keeps running
            serve.shutdown()
            ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
