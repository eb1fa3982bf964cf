"""Ray Serve past one process per replica: replicas that are sequence-parallel groups, and autoscaling.

CPU replicas of the tiny model (2 heads: 2 ranks) over gloo, behind Serve's proxy on loopback, one Ray
instance of 2 logical CPUs: the Serve config of docs/ray-service.yaml (as CI must change it:
tests/ray_service_config.py), replicas of 2 ranks autoscaled 1 to 2 under a burst of clients, their
images those of one process, then back to 1 when the load ends, every request answered 200 exactly
once (each request id in exactly one replica's history); then a rank killed mid-request fails that
request at once (no hang), Serve's health check replaces the whole group, and the new group serves.
(One test: each replica start costs ~15-20 s on 2 cores.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ray_service_config import application, ci_args
from serving_server import free_port
from zimage_trt.serving import ray_deployment
from zimage_trt.serving.ray_ranks import RANK_NAMESPACE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]

SIZE = 256
KEY = "scaling-test-key-" + "k" * 20
DEADLINE_S = 90.0  # no request may take longer: a hang fails the test
# How often replicas and the proxy tell Serve's autoscaler their load (Serve's default: 10 s); environment
# variables of Serve, read by the processes the local Ray instance starts.
FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    saved = {name: os.environ.get(name) for name in FAST_METRICS}
    os.environ.update(FAST_METRICS)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _call(base: str, path: str, body: dict | None = None, request_id: str | None = None, key: str | None = None):
    """(status, parsed JSON or text, headers); a client time-out raises (a hang fails the test)."""
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-ID"] = request_id
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            status, raw, answer_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, answer_headers = error.code, error.read(), dict(error.headers)
    try:
        return status, json.loads(raw), answer_headers
    except ValueError:
        return status, raw.decode(errors="replace"), answer_headers


def _generate(base: str, seed: int, steps: int, request_id: str | None = None, key: str | None = None):
    body = {"prompt": "a red fox in fresh snow", "size": f"{SIZE}x{SIZE}", "seed": seed, "num_inference_steps": steps}
    return _call(base, "/v1/images/generations", body, request_id, key)


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))), dtype=np.int16)


def _solo(pipe, seed: int, steps: int) -> np.ndarray:
    image = pipe("a red fox in fresh snow", height=SIZE, width=SIZE, num_inference_steps=steps,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


def _board():
    import ray

    return ray.get_actor(f"stats:{ray_deployment.APP_NAME}", namespace=ray_deployment.BOARD_NAMESPACE)


def _replica_states() -> dict:
    from ray import serve

    app = serve.status().applications.get(ray_deployment.APP_NAME)
    deployment = app.deployments.get(ray_deployment.DEPLOYMENT_NAME) if app is not None else None
    return dict(deployment.replica_states) if deployment is not None else {}


def _wait_for(condition, within_s: float, what: str, period_s: float = 0.25):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period_s)
    pytest.fail(f"not within {within_s:.0f} s: {what}")


def _remove_application() -> None:
    import ray
    from ray import serve

    serve.delete(ray_deployment.APP_NAME)
    try:  # a killed replica's report would linger for STALE_AFTER_S in the next test's stats
        ray.kill(_board())
    except ValueError:
        pass


def test_the_rayservice_config_scales_two_rank_replicas_up_and_down_and_replaces_a_broken_group(
        cluster, tiny_cpu_pipe, tmp_path):
    import ray
    from ray import serve
    from ray.serve.schema import ServeApplicationSchema

    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    app = ServeApplicationSchema.model_validate({**application(), "args": ci_args(key_file)})
    builder = ray_deployment.app_builder if app.import_path.endswith(":app_builder") else None
    assert builder is not None and app.args["sequence_parallel"] == 2 and app.args["autoscale"] == "1,2"
    serve.run(builder(app.args), name=app.name, route_prefix=app.route_prefix)
    try:
        assert _replica_states() == {"RUNNING": 1}  # min_replicas
        assert _generate(cluster, 0, steps=2)[0] == 401  # the config's API key holds

        # What Serve runs, sampled all along: most replicas RUNNING at once, and per replica the last stats.
        seen = {"running": 0, "replicas": {}}
        stop_watching = threading.Event()

        def watch():
            while not stop_watching.wait(0.25):
                seen["running"] = max(seen["running"], _replica_states().get("RUNNING", 0))
                try:
                    for replica, _, stats, _ in ray.get(_board().collect.remote(3.0), timeout=10):
                        seen["replicas"][replica] = stats
                except Exception:  # noqa: BLE001 - a sample lost; the next comes in 0.25 s
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        # A burst: 6 clients, back to back, until the second replica has answered a request (or a deadline).
        answers, lock = [], threading.Lock()
        enough = threading.Event()
        started = time.perf_counter()

        def client(index: int):
            for i in range(1000):
                if enough.is_set() or time.perf_counter() - started > 150:
                    return
                request_id, seed = f"burst-{index}-{i}", 1000 * index + i
                answer = _generate(cluster, seed, steps=30, request_id=request_id, key=KEY)
                with lock:
                    answers.append((request_id, seed, answer))
                done = sorted(stats["counts"]["completed"] for stats in list(seen["replicas"].values()))
                if len(done) >= 2 and done[-2] >= 1:
                    enough.set()

        clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(200)
        burst_s = time.perf_counter() - started
        assert enough.is_set(), f"the second replica did not serve within the burst: {_replica_states()}"
        assert seen["running"] == 2
        statuses = [answer[0] for _, _, answer in answers]
        assert statuses == [200] * len(answers), [a for _, _, a in answers if a[0] != 200][:3]
        for request_id, seed, (_, body, headers) in answers:
            assert body["request_id"] == request_id and body["data"][0]["seed"] == seed
        for request_id, seed, (_, body, _) in answers[:2]:  # spot checks: the image of that seed
            assert np.abs(_pixels(body) - _solo(tiny_cpu_pipe, seed, 30)).max() <= 2, request_id

        # Each request ran exactly once, on one replica: both replicas' histories, before any is removed.
        sent = {request_id for request_id, _, _ in answers}
        stats = _wait_for(lambda: (lambda st: st if sum(r["counts"]["completed"] for r in st["replicas"]) >= len(sent)
                                   else None)(_call(cluster, "/v1/stats", key=KEY)[1]), 10, "every answer reported")
        ran = [entry["request_id"] for r in stats["replicas"] for entry in r["recent"]
               if entry["request_id"].startswith("burst-")]
        assert sorted(ran) == sorted(sent), "a request ran twice, or not at all"
        assert sum(r["counts"]["completed"] for r in stats["replicas"]) == len(sent)
        assert [r["sequence_parallel"] for r in stats["replicas"]] == [2, 2]
        per_replica = {r["replica"]: r["counts"]["completed"] for r in stats["replicas"]}

        # Idle (a trickle of one request at a time): back to min_replicas after downscale_delay, every
        # request answered while a replica is removed (it finishes what it holds first).
        trickle, quiet_from = [], time.perf_counter()
        while True:
            states = _replica_states()
            if states == {"RUNNING": 1} and trickle and time.perf_counter() - trickle[-1][1] < 5:
                break
            assert time.perf_counter() - quiet_from < 90, f"no scale-down: {states}"
            status = _generate(cluster, 5, steps=2, request_id=f"trickle-{len(trickle)}", key=KEY)[0]
            trickle.append((status, time.perf_counter(), states))
        down_s = time.perf_counter() - quiet_from
        assert [status for status, *_ in trickle] == [200] * len(trickle), trickle
        assert any(sum(states.values()) > 1 for *_, states in trickle)  # some sent while the second one went
        stop_watching.set()
        watcher.join(5)

        # Rank 1 of the remaining replica killed in the middle of a long request: that request fails at once
        # (nothing hangs), Serve's health check replaces the whole group, and the new group serves.
        (replica,) = _wait_for(lambda: [r for r, *_ in ray.get(_board().collect.remote(3.0))], 10, "one report")
        result = {}
        runner = threading.Thread(target=lambda: result.update(
            answer=_generate(cluster, 7, steps=50, request_id="long", key=KEY), at=time.perf_counter()))
        runner.start()
        _wait_for(lambda: any(s["queue"]["running"] for _, _, s, _ in ray.get(_board().collect.remote(3.0))),
                  30, "the long request running")
        killed_at = time.perf_counter()
        ray.kill(ray.get_actor(f"{app.name}#{replica}:rank1", namespace=RANK_NAMESPACE), no_restart=True)
        runner.join(DEADLINE_S)
        assert not runner.is_alive(), "the request of the broken group hung"
        status, body, _ = result["answer"]
        # Whichever sees the dead rank first answers it: the step's collective (500, the request's own failure)
        # or the group's watcher, which marks the replica failed and answers what it holds 503 (retry elsewhere).
        assert (status, body["error"]["code"]) in {(500, "internal_error"), (503, "shutting_down")}, (status, body)
        failed_status = status
        failed_after = result["at"] - killed_at
        assert failed_after < 15, failed_after
        # Until Serve replaces it, the broken replica says so: not ready, and a request is answered 503 with
        # Retry-After at once (not run into the broken group).
        _wait_for(lambda: _call(cluster, "/readyz")[0] == 503, 10, "/readyz 503 on the broken replica", 0.05)
        status, body, headers = _generate(cluster, 8, steps=2, key=KEY)
        assert status == 503 and "retry-after" in {k.lower() for k in headers}, (status, body)
        _wait_for(lambda: (lambda reports: len(reports) == 1 and reports[0][0] != replica
                           and reports[0][2]["state"] == "ready")(ray.get(_board().collect.remote(3.0))),
                  120, "a new replica of two ranks ready")
        _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 30, "Serve's replica RUNNING")
        back_s = time.perf_counter() - killed_at
        status, body, _ = _generate(cluster, 1, steps=2, key=KEY)
        assert status == 200 and np.abs(_pixels(body) - _solo(tiny_cpu_pipe, 1, 2)).max() <= 2
        print(f"\nautoscale 1 -> 2 two-rank replicas: {len(answers)} burst requests from 6 clients in {burst_s:.1f} s, "
              f"all 200, each run once {per_replica}; back to 1 replica {down_s:.1f} s after the burst, "
              f"{len(trickle)} requests meanwhile, all 200; rank 1 killed mid-request: that request {failed_status} "
              f"{failed_after:.2f} s later, a new 2-rank replica serving {back_s:.1f} s after the kill")
    finally:
        _remove_application()
