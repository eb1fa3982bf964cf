"""The HTTP service under Ray Serve: two CPU replicas of the tiny model behind Serve's proxy.

One Ray instance for the module (starting Ray and two replicas is most of the time): requests are
answered by both replicas and match solo pipeline runs by seed; /v1/stats and /metrics cover both;
over `max_queued_requests` the proxy answers 429 (with Retry-After) at once, and admits no more than the
capacity; a keyless server answers only loopback host names; a replica killed mid-load fails only its
in-flight requests (a 5xx, none hangs) and Serve starts a new one.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.serving import ray_deployment
from zimage_trt.testing.tiny import make_tiny_components

from serving_server import get_with_host

# One Ray instance for the module: `make test-slow` runs with `--dist loadfile`, so these tests share one
# pytest-xdist worker (xdist 3.8's `loadgroup` did not keep xdist_group-marked tests together here).
pytestmark = pytest.mark.slow

SIZE = 256
STEPS = 2
REPLICAS = 2
MAX_ONGOING = 2
MAX_QUEUED = 2
DEADLINE_S = 60.0  # no request may take longer: a hang fails the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    # Small on purpose: 2 logical CPUs (one per replica), the smallest object store Ray accepts.
    ray.init(num_cpus=REPLICAS, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ray_deployment._parser().parse_args([
        "--tiny", "--device", "cpu", "--size", f"{SIZE}x{SIZE}", "--replicas", str(REPLICAS),
        "--max-ongoing-requests", str(MAX_ONGOING), "--max-queued-requests", str(MAX_QUEUED),
        "--health-check-period", "1"])
    replica_args, options = ray_deployment.replica_resources(args, cluster_gpus=0)
    assert options == {"num_cpus": 1.0} and replica_args.device == "cpu"
    serve.run(ray_deployment.deployment(replica_args, options), name=ray_deployment.APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _call(base: str, path: str, body: dict | None = None, timeout: float = DEADLINE_S):
    """(status, parsed JSON or text, seconds, headers); a client time-out raises (a hang fails the test)."""
    started = time.perf_counter()
    request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, headers = error.code, error.read(), dict(error.headers)
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw.decode(errors="replace")
    return status, data, time.perf_counter() - started, headers


def _generate(base: str, seed: int, steps: int = STEPS, admit: bool = False):
    """One generation; `admit`: retry the proxy's 429 for a full queue (a burst can fill its queue for the
    few milliseconds the router takes to place requests, before any replica is full)."""
    body = {"prompt": "a red fox in fresh snow", "size": f"{SIZE}x{SIZE}", "seed": seed, "num_inference_steps": steps}
    for _ in range(50):
        result = _call(base, "/v1/images/generations", body)
        if not (admit and result[0] == 429 and "backpressure" in str(result[1])):
            return result
        time.sleep(0.2)
    return result


def _settled_stats(base: str, condition, within_s: float = 10.0) -> dict:
    """/v1/stats once `condition` holds: other replicas' reports are up to a report period old."""
    deadline = time.perf_counter() + within_s
    while True:
        status, stats, *_ = _call(base, "/v1/stats")
        assert status == 200, stats
        if condition(stats) or time.perf_counter() > deadline:
            return stats
        time.sleep(0.25)


def _concurrently(fn, count: int) -> list:
    results: list = [None] * count

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as error:  # noqa: BLE001 - recorded: the test reports what went wrong
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S + 30)
    assert not any(thread.is_alive() for thread in threads), "a request hung past the deadline"
    return results


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))), dtype=np.int16)


def test_both_replicas_answer_and_match_solo_runs(cluster):
    seeds = list(range(REPLICAS * MAX_ONGOING))  # all admitted at once (no backpressure here)
    results = _concurrently(lambda i: _generate(cluster, seeds[i], admit=True), len(seeds))
    assert all(not isinstance(r, Exception) and r[0] == 200 for r in results), results

    pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    solo = {}
    differences = []
    for seed, (_, body, *_) in zip(seeds, results):
        assert body["data"][0]["seed"] == seed
        image = pipe("a red fox in fresh snow", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        solo[seed] = np.asarray(image, dtype=np.int16)
        # Same weights and seed in another process: equal up to rounding (8-bit pixels, float maths).
        differences.append(int(np.abs(_pixels(body) - solo[seed]).max()))
        assert differences[-1] <= 2, f"seed {seed}: replica and solo run differ by {differences[-1]} levels"
    print(f"\nlargest pixel difference, replica vs solo run, per seed: {differences}")
    assert np.abs(solo[0] - solo[1]).max() > 10  # the comparison can fail: seeds do change the image

    # What a replica reads to apply the API-key rule: Serve's HTTP address (a private Ray API, so checked).
    assert ray_deployment._proxy_host() == "127.0.0.1"
    # Keyless, as the one-GPU server: a request addressed to another name (a rebound one) is refused.
    assert get_with_host(cluster, "/healthz", "evil.example")[0] == 421
    assert get_with_host(cluster, "/healthz", "localhost")[0] == 200

    stats = _settled_stats(cluster, lambda st: sum(r["counts"]["completed"] for r in st["replicas"]) >= len(seeds))
    assert stats["totals"]["replicas"] == REPLICAS and stats["totals"]["ready_replicas"] == REPLICAS
    per_replica = {r["replica"]: r["counts"]["completed"] for r in stats["replicas"]}
    assert len(per_replica) == REPLICAS and sum(per_replica.values()) >= len(seeds)
    assert all(done > 0 for done in per_replica.values()), f"one replica answered nothing: {per_replica}"
    assert stats["counts"]["completed"] == sum(per_replica.values())
    assert stats["latency"]["request_ms"]["count"] == len(stats["recent"]) >= len(seeds)

    status, metrics, *_ = _call(cluster, "/metrics")
    assert status == 200
    for replica in per_replica:
        assert f'zimage_http_requests_total{{replica="{replica}",status="200"}}' in metrics

    # Progress events come through Serve's proxy as they happen, not only the final image.
    request = urllib.request.Request(cluster + "/v1/images/generations?stream=true", method="POST",
                                     data=json.dumps({"prompt": "a fox", "size": f"{SIZE}x{SIZE}", "seed": 3,
                                                      "num_inference_steps": STEPS}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        events = [line.split(":", 1)[1].strip() for line in response.read().decode().splitlines()
                  if line.startswith("event:")]
    assert events[0] == "queued" and events.count("step") == STEPS and events[-1] == "done", events


def test_over_max_queued_requests_is_answered_429_at_once(cluster):
    # The deployment holds MAX_ONGOING per replica plus MAX_QUEUED in the proxy; the rest are refused
    # at once with 429 and Retry-After, as the one-GPU server refuses when its queue is full.
    capacity = REPLICAS * MAX_ONGOING + MAX_QUEUED
    results = _concurrently(lambda i: (*_generate(cluster, 100 + i, steps=8), time.perf_counter()), capacity + 6)
    assert not any(isinstance(r, Exception) for r in results), results
    statuses = [r[0] for r in results]
    refused = [r for r in results if r[0] == 429]
    # How many are admitted is timing: Serve's router may refuse a burst before it has seen every replica's
    # free slots, and a request that finishes during the burst frees one. What must hold: some are served,
    # no more than the capacity plus the slots freed before the last refusal, the excess is refused at once,
    # nothing else happens.
    assert statuses.count(200) >= 1 and refused, statuses
    assert set(statuses) <= {200, 429}, statuses
    last_refusal = max(r[4] for r in refused)
    freed = sum(1 for r in results if r[0] == 200 and r[4] < last_refusal)
    # Serve's router picks a replica from a cached count of its ongoing requests, so in a burst up to one
    # request per replica gets past the configured limit before the counts catch up (seen: 8 served with a
    # capacity of 6 on two replicas, none finished before the last 429). A deployment 3 over its limit (the
    # planted break) serves 11.
    assert statuses.count(200) <= capacity + freed + REPLICAS, (statuses, f"{freed} finished before the last 429")
    assert all("backpressure" in str(r[1]) and r[2] < 5.0 for r in refused), refused
    print(f"\nbackpressure: {statuses.count(200)} x 200, {len(refused)} x 429 within "
          f"{max(r[2] for r in refused) * 1000:.0f} ms")
    retry_after = {r[3].get("Retry-After") or r[3].get("retry-after") for r in refused}
    assert retry_after == {str(int(ray_deployment.BACKPRESSURE_RETRY_AFTER_S))}, retry_after


def test_killed_replica_fails_only_its_requests_and_comes_back(cluster):
    import ray
    from ray import serve

    before = {r["replica"] for r in _call(cluster, "/v1/stats")[1]["replicas"]}
    board = ray.get_actor(f"stats:{ray_deployment.APP_NAME}", namespace=ray_deployment.BOARD_NAMESPACE)
    count = REPLICAS * MAX_ONGOING  # all admitted: what fails is the kill's doing, not backpressure
    started = time.perf_counter()
    killed_at, victims = [], []

    def kill():
        # A replica that reports a running request (reports are read from the board directly, so this
        # takes no replica's request slot); its second request waits behind it, a request lasts seconds.
        while time.perf_counter() - started < DEADLINE_S and not victims:
            victims.extend(r for r, _, stats, _ in ray.get(board.collect.remote(5.0)) if stats["queue"]["running"])
            time.sleep(0.05)
        killed_at.append(time.perf_counter())
        actor = f"SERVE_REPLICA::{ray_deployment.APP_NAME}#{ray_deployment.DEPLOYMENT_NAME}#{victims[0]}"
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)

    killer = threading.Thread(target=kill)
    killer.start()
    results = _concurrently(lambda i: (*_generate(cluster, 200 + i, steps=50, admit=True), time.perf_counter()),
                            count)
    killer.join()
    assert victims, "no replica was seen running a request"
    assert not any(isinstance(r, Exception) for r in results), results  # every request answered
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 500}, statuses  # an image, or the proxy's 500 for the dead replica
    assert statuses.count(200) >= 1 and statuses.count(500) >= 1, statuses
    failed_after_kill = [r[4] - killed_at[0] for r in results if r[0] == 500]
    print(f"\nkill mid-load: {statuses} {[r[1] for r in results if r[0] >= 500]}; the 500s came "
          f"{max(failed_after_kill):.2f}s after the kill at most; all answered "
          f"{max(r[4] for r in results) - started:.1f}s after the load started")

    assert victims[0] in before
    # Serve's controller replaces the dead replica. A replica reports only once it has loaded and warmed:
    # two reports again, one of them new, means the new replica serves.
    deadline = time.perf_counter() + 120.0
    while time.perf_counter() < deadline:
        replicas = _call(cluster, "/v1/stats")[1]["replicas"]
        after = {r["replica"] for r in replicas}
        if len(after) == REPLICAS and after != before and all(r["state"] == "ready" for r in replicas):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica did not come back: {before} -> {after}")
    back_after = time.perf_counter() - killed_at[0]
    assert after & before == before - {victims[0]}, (before, victims, after)
    for _ in range(40):  # Serve marks it RUNNING once its app has started, just after its first report
        state = serve.status().applications[ray_deployment.APP_NAME].deployments[ray_deployment.DEPLOYMENT_NAME]
        if state.replica_states.get("RUNNING", 0) == REPLICAS:
            break
        time.sleep(0.5)
    assert state.replica_states.get("RUNNING", 0) == REPLICAS, state.replica_states
    results = _concurrently(lambda i: _generate(cluster, 300 + i, admit=True), 4)
    assert [r[0] for r in results] == [200] * 4

    # The stats board itself lost: /v1/stats still answers (that replica alone), and the replicas make
    # a new board that fills again with both.
    ray.kill(ray.get_actor(f"stats:{ray_deployment.APP_NAME}", namespace=ray_deployment.BOARD_NAMESPACE))
    status, stats, *_ = _call(cluster, "/v1/stats")
    assert status == 200 and 1 <= stats["totals"]["replicas"] <= REPLICAS
    deadline = time.perf_counter() + 30.0
    while _call(cluster, "/v1/stats")[1]["totals"]["replicas"] != REPLICAS and time.perf_counter() < deadline:
        time.sleep(0.5)
    assert _call(cluster, "/v1/stats")[1]["totals"]["replicas"] == REPLICAS
    print(f"a new replica loaded, warmed and serving {back_after:.1f}s after the kill")
