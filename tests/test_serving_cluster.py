"""Ray Serve's side of the service without a cluster: merged stats and metrics, the stats board, the
application builder (`serve run` arguments), the replicas' resources, the documented config file and
`zimage-trt serve --ray`'s refusals. (The deployment itself runs in test_serving_ray.py, slow.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zimage_trt import cli
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.serving import cluster_stats, ray_deployment
from zimage_trt.serving.cluster_stats import StatsBoard, merge_metrics, merge_stats
from zimage_trt.serving.settings import ServeConfigError

ROOT = Path(__file__).resolve().parents[1]


def _replica_stats(state: str, completed: int, request_ms: list[float], t0: float, waiting_etas=(), running=False):
    recent = [{"t": t0 + i, "request_id": f"r{i}", "size": "256x256", "n": 1, "steps": 8, "request_ms": ms,
               "queue_wait_ms": 1.0, "per_image_ms": ms, "step_ms": ms / 8} for i, ms in enumerate(request_ms)]
    return {
        "state": state, "ready": state == "ready", "failure": None, "device": "cuda", "uptime_s": 10.0 + completed,
        "sizes": ["1024x1024", "512x512"] if completed else ["1024x1024"], "any_size": False,
        "queue": {"depth": len(waiting_etas), "max": 32,
                  "running": {"request_id": "run", "step": 3} if running else None,
                  "waiting": [{"request_id": f"w{eta}", "position": i, "eta_start_s": eta, "waited_s": 0.1}
                              for i, eta in enumerate(waiting_etas)]},
        "counts": {"submitted": completed + len(waiting_etas), "completed": completed, "failed": 0},
        "latency": {name: summarize(e[name] for e in recent) for name in ("request_ms", "per_image_ms")},
        "recent": recent, "last_steps_ms": [float(completed)] * 8,
        "gpu": {"name": "H100", "gpu_util_pct": 90.0 + completed}, "pipeline": {"denoise_ms": {}},
    }


def test_merged_stats_keep_one_service_shape_with_replicas_and_totals():
    now = 1000.0
    a = _replica_stats("ready", 3, [100.0, 110.0, 120.0], now - 10, waiting_etas=(2.0, 4.0), running=True)
    b = _replica_stats("ready", 2, [300.0, 310.0], now - 5, waiting_etas=(1.0,))
    merged = merge_stats([("a", 0.2, a), ("b", 0.7, b)], now=now)

    # The keys the dashboard reads for one service are all there, for the deployment as a whole.
    assert set(a) <= set(merged)
    assert merged["state"] == "ready" and merged["ready"] is True
    assert merged["counts"] == {"submitted": 8, "completed": 5, "failed": 0}
    assert merged["queue"]["depth"] == 3 and merged["queue"]["max"] == 64
    assert [(w["replica"], w["eta_start_s"]) for w in merged["queue"]["waiting"]] == [("b", 1.0), ("a", 2.0), ("a", 4.0)]
    assert merged["queue"]["running"]["replica"] == "a" and len(merged["queue"]["running_all"]) == 1
    assert merged["sizes"] == ["1024x1024", "512x512"]
    # Percentiles over every replica's requests (not an average of the replicas' percentiles).
    every = [100.0, 110.0, 120.0, 300.0, 310.0]
    assert merged["latency"]["request_ms"] == pytest.approx(summarize(every))
    assert [e["replica"] for e in merged["recent"]] == ["a", "a", "a", "b", "b"]  # by time
    assert merged["last_steps_ms"] == b["last_steps_ms"]  # the replica that finished last
    assert [g["replica"] for g in merged["gpus"]] == ["a", "b"] and merged["gpu"]["replica"] == "a"
    assert [(r["replica"], r["age_s"], r["counts"]["completed"]) for r in merged["replicas"]] == [("a", 0.2, 3), ("b", 0.7, 2)]
    assert merged["totals"] == {"replicas": 2, "ready_replicas": 2, "waiting": 3, "running": 1, "completed": 5,
                                "images_per_s": pytest.approx(5 / 60.0), "window_s": 60.0}


def test_merged_stats_of_a_restarting_deployment_and_of_none():
    now = 1000.0
    ready = _replica_stats("ready", 1, [100.0], now - 100)  # its one request is older than the window
    loading = _replica_stats("loading", 0, [], now)
    merged = merge_stats([("a", 0.1, ready), ("b", 0.1, loading)], now=now)
    assert merged["state"] == "degraded" and merged["ready"] is True
    assert merged["totals"]["ready_replicas"] == 1 and merged["totals"]["images_per_s"] == 0.0
    empty = merge_stats([], now=now)
    assert empty["state"] == "loading" and empty["ready"] is False and empty["replicas"] == []
    # An empty summary is null, not NaN (JSON has no NaN).
    assert empty["latency"] == {} and merge_stats([("b", 0.1, loading)], now=now)["latency"]["request_ms"]["mean"] is None


def test_merged_metrics_label_each_replica_and_parse_back():
    texts = []
    for replica, served in (("a", 3), ("b", 5)):
        registry = CollectorRegistry()
        requests = Counter("zimage_http_requests", "answered", ["status"], registry=registry)
        requests.labels(status="200").inc(served)
        Histogram("zimage_request_seconds", "latency", buckets=(0.5, 1.0), registry=registry).observe(0.7)
        Gauge("zimage_queue_depth", "waiting", registry=registry).set(served - 3)
        texts.append((replica, generate_latest(registry).decode()))
    merged = merge_metrics(texts).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    counts = {s.labels["replica"]: s.value for s in families["zimage_http_requests"].samples if s.name.endswith("_total")}
    assert counts == {"a": 3.0, "b": 5.0}
    assert {s.labels["replica"]: s.value for s in families["zimage_queue_depth"].samples} == {"a": 0.0, "b": 2.0}
    buckets = [s for s in families["zimage_request_seconds"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["replica"], s.labels["le"], s.value) for s in buckets} >= {("a", "1.0", 1.0), ("b", "0.5", 0.0)}
    assert merged.count("# TYPE zimage_queue_depth gauge") == 1  # one family, two labelled samples


def test_board_forgets_replicas_that_stopped_reporting(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cluster_stats.time, "time", lambda: clock[0])
    board = StatsBoard()
    board.put("a", {"state": "ready"}, "text-a")
    clock[0] += 3.0
    board.put("b", {"state": "ready"})
    assert [(r, age) for r, age, _, _ in board.collect(max_age_s=5.0)] == [("a", 3.0), ("b", 0.0)]
    clock[0] += 2.5  # a: 5.5 s since its last report (killed), b: 2.5 s
    assert [r for r, *_ in board.collect(max_age_s=5.0)] == ["b"]
    board.put("a", {"state": "ready"})  # a report brings it back
    board.remove("b")
    assert [r for r, *_ in board.collect(max_age_s=5.0)] == ["a"]
    assert math.isclose(cluster_stats.STALE_AFTER_S, 5 * cluster_stats.REPORT_PERIOD_S)


def test_app_builder_takes_the_serve_options_and_refuses_unknown_ones():
    app = ray_deployment.app_builder({"tiny": True, "device": "cpu", "size": ["256x256"], "replicas": 3,
                                      "max_ongoing_requests": 2, "max_queued_requests": "7"})
    deployment = app._bound_deployment
    assert deployment.name == ray_deployment.DEPLOYMENT_NAME
    assert (deployment.num_replicas, deployment.max_ongoing_requests, deployment.max_queued_requests) == (3, 2, 7)
    assert deployment.ray_actor_options == {"num_cpus": 1.0}
    backpressure = deployment.backpressure_config  # a full proxy queue: 429 + Retry-After, as on one GPU
    assert (backpressure.status_code, backpressure.retry_after_s) == (429, ray_deployment.BACKPRESSURE_RETRY_AFTER_S)
    replica_args = deployment.init_args[0]
    assert replica_args.device == "cpu" and replica_args.size == ["256x256"] and replica_args.tiny is True
    with pytest.raises(ServeConfigError, match="unknown argument 'replica'.*replicas"):
        ray_deployment.app_builder({"tiny": True, "replica": 2})
    with pytest.raises(ServeConfigError, match="http_options"):
        ray_deployment.app_builder({"tiny": True, "host": "0.0.0.0"})
    with pytest.raises(ServeConfigError, match="invalid arguments"):
        ray_deployment.app_builder({"tiny": True, "replicas": "two"})
    with pytest.raises(ServeConfigError, match="--replicas"):
        ray_deployment.app_builder({"tiny": True, "device": "cpu", "replicas": 0})
    with pytest.raises(ServeConfigError, match="--model"):
        ray_deployment.app_builder({"device": "cpu"})  # neither a model nor --tiny


def test_replicas_get_one_gpu_each_or_a_cpu():
    args = ray_deployment._parser().parse_args(["--tiny", "--cpus-per-replica", "2"])
    on_gpus, options = ray_deployment.replica_resources(args, cluster_gpus=8)
    assert on_gpus.device == "cuda" and options == {"num_cpus": 2.0, "num_gpus": 1}
    assert args.device is None  # the caller's arguments are left as they were
    on_cpus, options = ray_deployment.replica_resources(args, cluster_gpus=0)
    assert on_cpus.device == "cpu" and options == {"num_cpus": 2.0}
    args.device = "cuda:1"
    with pytest.raises(ServeConfigError, match="its own GPU.*--device cuda"):
        ray_deployment.replica_resources(args, cluster_gpus=8)
    args.device = "mps"
    with pytest.raises(ServeConfigError, match="'cuda'.*'cpu'"):
        ray_deployment.replica_resources(args, cluster_gpus=8)


def test_documented_serve_config_is_valid_for_ray_serve_and_for_the_builder():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "docs" / "ray-serve.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    module, name = application.import_path.split(":")
    assert module == ray_deployment.__name__ and getattr(ray_deployment, name) is ray_deployment.app_builder
    parsed = ray_deployment._parser().parse_args(
        [item for key, value in application.args.items() for item in (f"--{key.replace('_', '-')}", str(value))])
    assert parsed.replicas == application.args["replicas"] and parsed.engine_dir == application.args["engine_dir"]


def test_sequence_parallel_replicas_reserve_one_bundle_per_rank_on_one_node():
    parse = ray_deployment._parser().parse_args
    one = ray_deployment.replica_resources(parse(["--tiny"]), cluster_gpus=8)[0]
    assert ray_deployment.replica_placement(one) == {}  # one process per replica: as before
    on_gpus, options = ray_deployment.replica_resources(parse(["--tiny", "--sequence-parallel", "4",
                                                               "--cpus-per-replica", "2"]), cluster_gpus=8)
    assert options == {"num_cpus": 2.0, "num_gpus": 1}  # rank 0, the replica actor: bundle 0
    assert ray_deployment.replica_placement(on_gpus) == {
        "placement_group_bundles": [{"CPU": 2.0, "GPU": 1.0}] * 4, "placement_group_strategy": "STRICT_PACK"}
    on_cpus, _ = ray_deployment.replica_resources(parse(["--tiny", "--sequence-parallel", "2"]), cluster_gpus=0)
    assert ray_deployment.replica_placement(on_cpus)["placement_group_bundles"] == [{"CPU": 1.0}] * 2
    with pytest.raises(ServeConfigError, match="--sequence-parallel must be >= 1"):
        ray_deployment.replica_placement(parse(["--tiny", "--sequence-parallel", "0"]))


def test_the_ranks_of_a_replica_learn_every_rank_s_gpu_in_rank_order():
    import threading

    import torch.distributed as dist

    from zimage_trt.serving.ray_ranks import rank_device, shared_gpu_ids

    store, seen = dist.HashStore(), {}
    own = {0: "5", 1: "2", 2: "7"}  # as Ray gives them: any order, one each
    ranks = [threading.Thread(target=lambda r=r: seen.__setitem__(r, shared_gpu_ids(store, r, 3, own[r])))
             for r in (2, 0, 1)]  # (in any order: each waits for the others' keys)
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(10)
    assert seen == {r: ["5", "2", "7"] for r in range(3)}  # rank r then takes cuda:r of CUDA_VISIBLE_DEVICES=5,2,7
    assert rank_device("cpu", store, 0, 3).type == "cpu"


def test_autoscale_becomes_serves_autoscaling_config_and_bad_values_are_refused():
    parse = ray_deployment._parser().parse_args
    assert ray_deployment.scaling(parse(["--tiny", "--replicas", "3"])) == {"num_replicas": 3}
    config = ray_deployment.scaling(parse(["--tiny", "--autoscale", "1,4", "--target-ongoing-requests", "1.5"]))
    assert config == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1.5,
                                             "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                                             "look_back_period_s": 30.0}}
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**config["autoscaling_config"])  # Serve's own schema takes it
    assert ray_deployment.scaling(parse(["--tiny", "--autoscale", "0, 2"]))["autoscaling_config"]["min_replicas"] == 0
    for bad in ("3,1", "0,0", "2", "one,two", "-1,2"):
        with pytest.raises(ServeConfigError, match=f"--autoscale '{bad}': "):
            ray_deployment.scaling(parse(["--tiny", f"--autoscale={bad}"]))
    with pytest.raises(ServeConfigError, match=r"--target-ongoing-requests 8 must be > 0 and at most "
                                               r"--max-ongoing-requests \(4\)"):
        ray_deployment.scaling(parse(["--tiny", "--autoscale", "1,2", "--target-ongoing-requests", "8"]))
    with pytest.raises(ServeConfigError, match="--upscale-delay"):
        ray_deployment.scaling(parse(["--tiny", "--autoscale", "1,2", "--upscale-delay", "-1"]))
    with pytest.raises(ServeConfigError, match="--autoscale"):  # the application builder checks it too
        ray_deployment.app_builder({"tiny": True, "device": "cpu", "autoscale": "4,1"})


def test_the_rayservice_example_is_valid_and_its_serve_config_is_the_one_ci_runs(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from ray_service_config import CI_CHANGES, CI_DROPPED, application, ci_args, ray_service, serve_config

    service = ray_service()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(serve_config())
    (app,) = config.applications
    assert app.name == ray_deployment.APP_NAME and app.route_prefix == "/"
    module, name = app.import_path.split(":")
    assert module == ray_deployment.__name__ and getattr(ray_deployment, name) is ray_deployment.app_builder
    # Off loopback, as a Kubernetes service needs: so the API key is set (the replicas would refuse otherwise).
    assert config.http_options.host == "0.0.0.0" and application()["args"]["api_key_file"]

    # What the RayService deploys on GPUs: 2-GPU replicas, autoscaled 1 to 4, placed on one node each.
    production = ray_deployment.config_arguments(application()["args"])
    replica_args, options = ray_deployment.replica_resources(production, cluster_gpus=8)
    assert options == {"num_cpus": 4.0, "num_gpus": 1}
    assert ray_deployment.replica_placement(replica_args)["placement_group_bundles"] == [{"CPU": 4.0, "GPU": 1.0}] * 2
    scaled = ray_deployment.scaling(production)["autoscaling_config"]
    assert (scaled["min_replicas"], scaled["max_replicas"], scaled["target_ongoing_requests"]) == (1, 4, 2.0)
    # Worker pods hold what the largest deployment needs: 4 replicas x 2 GPUs.
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus_per_pod = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus_per_pod * workers["maxReplicas"] >= scaled["max_replicas"] * production.sequence_parallel

    # CI: the same application args, changed only where a 2-core CPU runner must differ.
    key_file = tmp_path / "key"
    ci = ci_args(key_file)
    changed = {key for key in set(ci) | set(application()["args"]) if ci.get(key) != application()["args"].get(key)}
    assert changed == {*CI_CHANGES, *CI_DROPPED, "api_key_file"} == {
        "model", "engine_dir", "tiny", "device", "size", "cpus_per_replica", "autoscale", "upscale_delay",
        "downscale_delay", "autoscale_look_back", "api_key_file"}
    for kept in ("sequence_parallel", "target_ongoing_requests", "max_ongoing_requests", "max_queued_requests",
                 "health_check_period"):
        assert ci[kept] == application()["args"][kept], kept
    ci_parsed = ray_deployment.config_arguments(ci)
    ci_scaled = ray_deployment.scaling(ci_parsed)["autoscaling_config"]
    assert {k: v for k, v in ci_scaled.items() if scaled[k] != v} == {
        "max_replicas": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0}


def test_cli_serve_ray_options_and_the_api_key_rule(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--ray", "--replicas", "--max-ongoing-requests", "--max-queued-requests", "--ray-address",
                   "--sequence-parallel", "--autoscale", "--target-ongoing-requests", "--upscale-delay",
                   "--downscale-delay", "--autoscale-look-back"):
        assert option in help_text
    assert "(default: 64)" in help_text  # --max-queued-requests shows its default
    # A public address without a key is refused before Ray starts.
    monkeypatch.delenv("ZIMAGE_TRT_API_KEY", raising=False)
    assert cli.main(["serve", "--ray", "--tiny", "--host", "0.0.0.0", "--replicas", "2"]) == 2
    assert "without an API key" in capsys.readouterr().err
