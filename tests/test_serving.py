"""The HTTP service in-process (Starlette's TestClient over the app, the tiny model on the CPU).

Images equal the same request run alone through the pipeline; every refusal has its status and a body
that names the field, the value and what is allowed (422), or says what to do (401, 413, 429, 503,
504); events stream in order; /metrics parses as Prometheus text; failures never show a stack trace.
Real processes (SIGTERM, the bind rule, the load test) are in test_serving_process.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from zimage_trt.serving import app as app_module
from zimage_trt.serving.app import AppSettings, create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.serving.settings import ServeConfigError, allowed_host_names, check_bind, is_loopback, read_api_key

from serving_server import get_with_host, running_server

SIZE = "256x256"
STEPS = 2
URL = "/v1/images/generations"
KEY = "k" * 12 + "-secret-key"
WAIT_S = 60

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class GatedPipe:
    """The tiny pipeline behind a gate the test opens: a request can be held running."""

    def __init__(self, pipe, fail_with: Exception | None = None):
        self._pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_with = fail_with
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if self.fail_with is not None and args and args[0] != "warm-up":
            raise self.fail_with
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def make_service(pipe, **settings) -> ImageService:
    limits = settings.pop("limits", ServingLimits(sizes=(SIZE,)))
    return ImageService(pipe, ServiceSettings(limits=limits, warm_steps=1, **settings))


@pytest.fixture(scope="module")
def client(tiny_cpu_pipe):
    service = make_service(tiny_cpu_pipe)
    with TestClient(create_app(service)) as test_client:
        assert service.wait_ready(WAIT_S), service.failure
        yield test_client


def body(**fields) -> dict:
    return {"prompt": "a red fox in the snow", "size": SIZE, "num_inference_steps": STEPS, "seed": 7, **fields}


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def solo(pipe, seed: int, prompt="a red fox in the snow", steps=STEPS) -> np.ndarray:
    out = pipe(prompt, height=256, width=256, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed))
    return np.asarray(out.images[0], dtype=np.int16)


def assert_same_image(served: np.ndarray, alone: np.ndarray) -> None:
    # The same computation on the same weights in one process, but in another thread (and PNG, which is
    # lossless): at most one 8-bit level apart, in case the CPU's math library splits work differently.
    assert served.shape == alone.shape
    assert np.abs(served - alone).max() <= 1


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name, data = [], None, []
    for line in text.splitlines() + [""]:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif not line and name is not None:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


# -- images ----------------------------------------------------------------------------------------
def test_images_equal_solo_runs_for_the_same_seeds(client, tiny_cpu_pipe):
    response = client.post(URL, json=body(n=2, seed=11))
    assert response.status_code == 200, response.text
    result = response.json()
    assert [item["seed"] for item in result["data"]] == [11, 12]
    assert result["request_id"] == response.headers["x-request-id"]
    served = [decode(item["b64_json"]) for item in result["data"]]
    for image, seed in zip(served, (11, 12)):
        assert_same_image(image, solo(tiny_cpu_pipe, seed))
    assert np.abs(served[0] - served[1]).max() > 10  # two seeds, two images
    timings = result["timings"]
    assert len(timings["per_image_ms"]) == 2 and len(timings["step_ms"]) == STEPS
    assert timings["queue_wait_ms"] >= 0 and timings["run_ms"] > 0


def test_without_a_seed_the_server_picks_one_and_says_which(client, tiny_cpu_pipe):
    result = client.post(URL, json={k: v for k, v in body().items() if k != "seed"}).json()
    seed = result["data"][0]["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert_same_image(decode(result["data"][0]["b64_json"]), solo(tiny_cpu_pipe, seed))


def test_stream_sends_queued_started_steps_then_done(client, tiny_cpu_pipe):
    response = client.post(URL + "?stream=true", json=body(n=2, seed=3))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names == ["queued", "started"] + ["step"] * (2 * STEPS) + ["done"], names
    queued = events[0][1]
    assert queued["position"] == 0 and queued["estimated_start_s"] >= 0 and queued["images"] == 2
    steps = [(data["image"], data["step"], data["steps"]) for name, data in events if name == "step"]
    assert steps == [(i, s, STEPS) for i in range(2) for s in range(1, STEPS + 1)]
    assert all(data["ms"] > 0 for name, data in events if name == "step")
    done = events[-1][1]
    assert [d["seed"] for d in done["data"]] == [3, 4]
    assert_same_image(decode(done["data"][1]["b64_json"]), solo(tiny_cpu_pipe, 4))


# -- refusals --------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("size", "1000x1000", "256x256"),  # not a served size
    ("size", "big", "256x256"),
    ("n", 0, ">= 1"),
    ("n", 99, "<= 4"),
    ("n", "two", "integer"),
    ("num_inference_steps", 0, ">= 1"),
    ("num_inference_steps", 10_000, "<= 50"),
    ("guidance_scale", -1.0, ">= 0"),
    ("guidance_scale", 1e9, "<= 20"),
    ("prompt", "", "at least 1"),
    ("prompt", "x" * 5000, "at most 4000 characters"),
    ("seed", -1, ">= 0"),
    ("response_format", "png", "'b64_json' or 'url'"),
    ("output_format", "gif", "'png', 'jpeg' or 'webp'"),
    ("output_compression", 101, "<= 100"),
    ("background", "transparent", "this model makes opaque images"),
    ("partial_images", 4, "<= 3"),
    ("quality", "ultra", "'auto'"),
    ("style", "pretty", "'vivid' or 'natural'"),
    ("moderation", "none", "'low' or 'auto'"),
    ("model", "/etc/passwd", "z-image-turbo"),  # no field names a file
    ("image_path", "/tmp/x.png", "no such field"),
]


@pytest.mark.parametrize("field, value, allowed", BAD_FIELDS, ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_is_a_422_naming_field_value_and_what_is_allowed(client, field, value, allowed):
    response = client.post(URL, json=body(**{field: value}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    # OpenAI's error object, plus the request id and every field at fault.
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", field)
    assert error["request_id"] == response.headers["x-request-id"]
    [problem] = [p for p in error["errors"] if p["field"] == field]
    assert allowed in problem["allowed"], problem
    assert f"{field}: {problem['allowed']}" in error["message"]  # what a client shows says it too
    shown = problem["value"]
    assert shown == value or (isinstance(value, str) and len(value) > 200 and shown.startswith(value[:200]))


def test_non_finite_numbers_and_invalid_text_are_422(client):
    response = client.post(URL, content=b'{"prompt": "a fox", "size": "256x256", "guidance_scale": NaN}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["errors"][0]["allowed"] == "a finite number"
    # A lone surrogate is valid JSON but not text.
    response = client.post(URL, content=b'{"prompt": "a fox \\ud800", "size": "256x256"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    [problem] = response.json()["error"]["errors"]
    assert problem["field"] == "prompt" and "valid Unicode text" in problem["allowed"]
    assert problem["value"] == "a fox \\ud800"


def test_not_json_is_400_and_a_big_body_is_413(client):
    response = client.post(URL, content=b"prompt=fox", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = client.post(URL, content=json.dumps(body(prompt="x" * 70_000)).encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "65536 bytes" in response.json()["error"]["message"]


def test_every_error_is_openais_error_object(client):
    """Whatever the path or the status: {"error": {"message", "type", "param", "code"}} (+ request_id)."""
    answers = {
        404: client.get("/v1/no-such-endpoint"),
        405: client.get(URL),
        400: client.post(URL, content=b"{", headers={"content-type": "application/json"}),
        415: client.post(URL, content=b"prompt=fox", headers={"content-type": "text/plain"}),
        413: client.post(URL, content=json.dumps(body(prompt="x" * 70_000)).encode(),
                         headers={"content-type": "application/json"}),
        422: client.post(URL, json=body(n=0)),
    }
    for status, response in answers.items():
        assert response.status_code == status, (status, response.text)
        error = response.json()["error"]
        assert {"message", "type", "param", "code", "request_id"} <= set(error), (status, error)
        assert error["type"] == "invalid_request_error" and error["request_id"] == response.headers["x-request-id"]
    assert answers[404].json()["error"]["code"] == "not_found" and answers[422].json()["error"]["param"] == "n"


def test_openai_streaming_on_the_wire(client):
    """The SSE event names are the payloads' types, as OpenAI's stream sends them."""
    response = client.post(URL, json=body(stream=True, partial_images=1, num_inference_steps=3))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [name for name, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert all(data["type"] == name for name, data in events)
    both = client.post(URL + "?stream=true", json=body(stream=True))
    assert both.status_code == 422 and both.json()["error"]["param"] == "stream"


def test_only_json_bodies_are_taken(client):
    # A form or text/plain post needs no CORS preflight: another site's page could send one blind.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(URL, content=json.dumps(body()).encode(), headers=headers)
        assert response.status_code == 415, content_type
        assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_the_host_rule_is_loopback_names_without_a_key_and_any_with_one():
    assert allowed_host_names(None, "127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_host_names(None, "::1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_host_names(None, "127.0.0.2") == ("localhost", "127.0.0.1", "::1", "127.0.0.2")
    assert allowed_host_names(KEY, "0.0.0.0") is None and allowed_host_names(KEY, "127.0.0.1") is None


def test_a_keyless_server_answers_only_loopback_host_names(tiny_cpu_pipe):
    """A real server (uvicorn on 127.0.0.1, the app `zimage-trt serve` runs, no key)."""
    with running_server(tiny_cpu_pipe) as (url, _):
        port = urllib.parse.urlsplit(url).port
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert get_with_host(url, "/healthz", host)[0] == 200, host
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", ""):
            status, raw = get_with_host(url, "/v1/stats", host)
            assert status == 421, host
            assert json.loads(raw)["error"]["code"] == "unknown_host"


def test_health_ready_stats_and_dashboard(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["sizes"] == [SIZE]
    client.post(URL, json=body(seed=1))
    stats = client.get("/v1/stats")
    # Strict JSON (no NaN), with what the dashboard draws.
    data = json.loads(stats.text, parse_constant=lambda name: pytest.fail(f"{name} in /v1/stats"))
    assert data["ready"] and data["queue"]["depth"] == 0 and data["queue"]["max"] == 32
    assert data["recent"][-1]["size"] == SIZE and data["recent"][-1]["per_image_ms"] > 0
    assert data["latency"]["per_image_ms"]["p95"] >= data["latency"]["per_image_ms"]["p50"] > 0
    assert len(data["last_steps_ms"]) == STEPS and data["counts"]["completed"] >= 1
    assert data["pipeline"]["calls"] >= 1  # pipe.stats(), warm-up excluded
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "dashboard.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/dashboard.js").headers["content-type"].startswith("text/javascript")


def test_metrics_parse_as_prometheus_text(client):
    client.post(URL, json=body(seed=2))
    client.post(URL, json=body(n=0))
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("zimage_ready", ())] == 1.0
    assert samples[("zimage_queue_depth", ())] == 0.0
    assert samples[("zimage_request_seconds_count", ())] >= 1
    assert samples[("zimage_stage_seconds_count", (("stage", "denoise"),))] >= 1
    assert samples[("zimage_step_seconds_count", ())] >= STEPS
    assert samples[("zimage_http_requests_total", (("status", "422"),))] >= 1
    assert not any(name.startswith("zimage_gpu") for name in families)  # no GPU here, no GPU series


def test_gpu_readings_become_gauges_in_their_units(tiny_cpu_pipe):
    class FakeSampler:  # what runtime/telemetry.GpuSampler reads from NVML on a GPU
        available, gpu_name = True, "H100"

        def sample(self):
            return {"sm_clock_mhz": 1980.0, "temperature_c": 61.0, "power_w": 512.5, "gpu_util_pct": 97.0,
                    "memory_used_mib": 1024.0}

    service = make_service(tiny_cpu_pipe)
    service._sampler = FakeSampler()
    families = {f.name: f for f in text_string_to_metric_families(service.metrics.render().decode())}
    value = {name: families[name].samples[0].value for name in families if name.startswith("zimage_gpu")}
    assert value == {"zimage_gpu_sm_clock_hertz": 1.98e9, "zimage_gpu_temperature_celsius": 61.0,
                     "zimage_gpu_power_watts": 512.5, "zimage_gpu_utilization_ratio": 0.97,
                     "zimage_gpu_memory_used_bytes": 2**30}
    assert families["zimage_gpu_power_watts"].samples[0].labels == {"gpu": "H100"}
    assert service.stats()["gpu"]["temperature_c"] == 61.0


# -- the API key -----------------------------------------------------------------------------------
def test_with_a_key_the_api_needs_the_bearer_token(tiny_cpu_pipe, monkeypatch):
    compared = []
    real_compare = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real_compare(a, b))
    service = make_service(tiny_cpu_pipe)
    with TestClient(create_app(service, AppSettings(api_key=KEY))) as keyed:
        assert service.wait_ready(WAIT_S)
        for path, method in ((URL, "post"), ("/v1/stats", "get"), ("/metrics", "get")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                response = getattr(keyed, method)(path, headers=headers, **({"json": body()} if method == "post" else {}))
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "Authorization: Bearer" in response.json()["error"]["message"]
        good = {"Authorization": f"Bearer {KEY}"}
        assert keyed.get("/v1/stats", headers=good).status_code == 200
        assert keyed.post(URL, json=body(), headers=good).status_code == 200
        assert compared  # constant-time comparison
        # Probes and the (static) page stay open.
        assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200
        assert keyed.get("/").status_code == 200


def test_bind_rule_and_key_files(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org") and not is_loopback("192.168.1.4")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", KEY)
    with pytest.raises(ServeConfigError, match="refusing to listen on 0.0.0.0 without an API key.*--api-key-file"):
        check_bind("0.0.0.0", None)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert read_api_key(str(key_file), environ={}) == KEY
    assert read_api_key(None, environ={"ZIMAGE_TRT_API_KEY": KEY}) == KEY
    assert read_api_key(None, environ={}) is None
    key_file.write_text("short\n")
    with pytest.raises(ServeConfigError, match="at least 16 characters"):
        read_api_key(str(key_file), environ={})
    with pytest.raises(ServeConfigError, match="cannot read the API key file"):
        read_api_key(str(tmp_path / "missing"), environ={})


def test_serve_refuses_a_public_address_without_a_key(capsys, monkeypatch):
    from zimage_trt.cli import main

    monkeypatch.delenv("ZIMAGE_TRT_API_KEY", raising=False)
    assert main(["serve", "--tiny", "--device", "cpu", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err


# -- queue, time-outs, shutdown, failures ----------------------------------------------------------
def _post_in_thread(client, results: list, payload: dict, index: int) -> threading.Thread:
    def run():
        results[index] = client.post(URL, json=payload)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_full_queue_is_429_with_retry_after_and_the_others_still_finish(tiny_cpu_pipe):
    gated = GatedPipe(tiny_cpu_pipe)
    service = make_service(gated, max_queue=1)
    with TestClient(create_app(service)) as gclient:
        assert service.wait_ready(WAIT_S)
        gated.gate.clear()
        gated.entered.clear()
        results = [None, None]
        threads = [_post_in_thread(gclient, results, body(seed=1), 0)]
        _wait_for(gated.entered.is_set, "the first request to run")
        threads.append(_post_in_thread(gclient, results, body(seed=2), 1))
        _wait_for(lambda: service.queue_depth == 1, "the second request to wait")
        full = gclient.post(URL, json=body(seed=3))
        assert full.status_code == 429
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "rate_limit_error"
        waiting = gclient.get("/v1/stats").json()["queue"]
        assert waiting["running"]["request_id"] and [w["position"] for w in waiting["waiting"]] == [0]
        assert waiting["waiting"][0]["eta_start_s"] >= 0
        gated.gate.set()
        for thread in threads:
            thread.join(WAIT_S)
        assert [r.status_code for r in results] == [200, 200]
        assert [r.json()["data"][0]["seed"] for r in results] == [1, 2]


def test_a_request_past_its_time_out_is_504_and_never_runs(tiny_cpu_pipe):
    gated = GatedPipe(tiny_cpu_pipe)
    service = make_service(gated, timeout_s=0.5)
    with TestClient(create_app(service)) as gclient:
        assert service.wait_ready(WAIT_S)
        gated.gate.clear()
        gated.entered.clear()
        results = [None]
        first = _post_in_thread(gclient, results, body(seed=1), 0)
        _wait_for(gated.entered.is_set, "the first request to run")
        calls = gated.calls
        late = gclient.post(URL, json=body(seed=2))  # waits behind the held one, past 0.5 s
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert late.json()["error"]["type"] == "server_error" and late.headers["x-should-retry"] == "false"
        gated.gate.set()
        first.join(WAIT_S)
        assert results[0].status_code == 504  # held past its own time-out too: stopped at its next step
        assert gated.calls == calls  # the waiting one never ran
        assert gclient.get("/v1/stats").json()["counts"]["timed_out"] == 2
        service.settings.timeout_s = WAIT_S  # (0.5 s is too short for an image on a busy runner)
        assert gclient.post(URL, json=body(seed=3)).status_code == 200  # and the service goes on


def test_shutdown_answers_waiting_requests_503_and_finishes_the_running_one(tiny_cpu_pipe):
    gated = GatedPipe(tiny_cpu_pipe)
    service = make_service(gated)
    with TestClient(create_app(service)) as gclient:
        assert service.wait_ready(WAIT_S)
        gated.gate.clear()
        gated.entered.clear()
        results = [None] * 3
        threads = [_post_in_thread(gclient, results, body(seed=1), 0)]
        _wait_for(gated.entered.is_set, "the first request to run")
        threads += [_post_in_thread(gclient, results, body(seed=s), s) for s in (1, 2)]
        _wait_for(lambda: service.queue_depth == 2, "two waiting requests")
        service.begin_shutdown()
        for thread in threads[1:]:
            thread.join(WAIT_S)
        assert [r.status_code for r in results[1:]] == [503, 503]
        assert results[1].json()["error"]["code"] == "shutting_down" and results[1].headers["retry-after"]
        assert gclient.post(URL, json=body()).status_code == 503  # nothing new is accepted
        assert gclient.get("/readyz").status_code == 503
        gated.gate.set()
        threads[0].join(WAIT_S)
        assert results[0].status_code == 200
    assert service.state == "stopped"


def test_a_failure_is_logged_with_the_request_id_and_never_shown(tiny_cpu_pipe, caplog):
    gated = GatedPipe(tiny_cpu_pipe, fail_with=RuntimeError("secret detail /srv/models/x"))
    service = make_service(gated)
    with TestClient(create_app(service)) as gclient, caplog.at_level(logging.ERROR, "zimage_trt.serving"):
        assert service.wait_ready(WAIT_S)
        shown = {}
        for url in (URL, URL + "?stream=true"):
            response = gclient.post(url, json=body())
            text = response.text
            assert "secret" not in text and "Traceback" not in text and "/srv" not in text
            rid = response.headers["x-request-id"]
            assert rid in text
            if url == URL:
                assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
                shown["json"] = response.json()["error"]["message"].replace(rid, "{rid}")
            else:
                name, data = sse_events(text)[-1]
                assert name == "error" and data["status"] == 500
                assert {k: data["error"][k] for k in ("type", "code", "request_id")} == {
                    "type": "server_error", "code": "internal_error", "request_id": rid}
                shown["sse"] = data["error"]["message"].replace(rid, "{rid}")
            assert any(rid in record.getMessage() and record.exc_info for record in caplog.records)
    # One message for one failure, streamed or not, naming its own request and where the details are.
    assert shown["sse"] == shown["json"] and "{rid}" in shown["json"] and "server log" in shown["json"]


def test_not_ready_until_warm(tiny_cpu_pipe):
    release = threading.Event()

    def slow_factory():
        assert release.wait(WAIT_S)
        return tiny_cpu_pipe

    service = make_service(slow_factory)
    with TestClient(create_app(service)) as gclient:
        assert gclient.get("/healthz").status_code == 200
        assert gclient.get("/readyz").status_code == 503
        response = gclient.post(URL, json=body())
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        release.set()
        assert service.wait_ready(WAIT_S)
        assert gclient.get("/readyz").status_code == 200


def test_the_pipelines_own_checks_run_before_queueing(tiny_cpu_pipe):
    # What the schema would let through (here: a model built without validation) still meets the
    # pipeline's own argument checks (request.check_request), before the request takes a queue slot.
    from zimage_trt.serving.schema import ImageGenerationRequest
    from zimage_trt.serving.service import ServiceError

    service = make_service(tiny_cpu_pipe)
    service.start(background=False)
    try:
        req = ImageGenerationRequest.model_construct(**body(prompt="a fox \ud800"), n=1, guidance_scale=0.0,
                                                     negative_prompt=None, response_format="b64_json", model=None)
        with pytest.raises(ServiceError) as refused:
            service.submit(req)
        assert refused.value.status == 422
        [problem] = refused.value.errors
        assert problem["field"] == "prompt" and "not valid Unicode" in problem["allowed"]
        assert problem["value"] == "a fox \\ud800"
        assert service.stats()["counts"]["submitted"] == 0
    finally:
        service.close()


def test_served_sizes_come_from_the_engine_manifests(tmp_path):
    import argparse

    from zimage_trt.engines.manifest import EngineShape, FileRecord, Manifest
    from zimage_trt.serving.command import build_service
    from zimage_trt.serving.service import served_sizes
    from zimage_trt.serving.settings import add_arguments

    def manifest(name, component, shapes):
        return Manifest(name=name, component=component, backend="torch-compiled", backend_version="2.13",
                        precision="fp16", shapes=[EngineShape(r, b, 512) for r, b in shapes],
                        files=[FileRecord(name + ".bin", "0" * 64, 1)], compute_capabilities=["9.0"],
                        torch_version="2.13", model={})

    manifest("denoiser-a", "denoiser", [("1024x1024", 1), ("768x1344", 1), ("1024x1024", 2)]).write(tmp_path)
    manifest("denoiser-b", "denoiser", [("512x512", 1), ("1024x1024", 1)]).write(tmp_path)
    manifest("vae", "vae_decoder", [("2048x2048", 1)]).write(tmp_path)
    assert served_sizes(tmp_path) == ["1024x1024", "768x1344", "512x512"]  # batch-1 denoiser shapes, once each

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    service = build_service(parser.parse_args(["--model", "m", "--engine-dir", str(tmp_path)]))
    assert service.limits.sizes == ("1024x1024", "768x1344", "512x512") and not service.limits.any_size
    assert build_service(parser.parse_args(["--tiny"])).limits.sizes == ("256x256",)
    chosen = build_service(parser.parse_args(["--tiny", "--size", "512x768", "--size", "256", "--max-n", "2"]))
    assert chosen.limits.sizes == ("512x768", "256x256") and chosen.limits.max_n == 2
    with pytest.raises(ServeConfigError, match="no denoiser engine manifests"):
        build_service(parser.parse_args(["--model", "m", "--engine-dir", str(tmp_path / "empty")]))
    with pytest.raises(ServeConfigError, match="pass --model"):
        build_service(parser.parse_args([]))


def test_with_fallback_any_valid_size_is_served(tiny_cpu_pipe):
    service = make_service(tiny_cpu_pipe, limits=ServingLimits(sizes=(SIZE,), any_size=True))
    with TestClient(create_app(service)) as fclient:
        assert service.wait_ready(WAIT_S)
        for size, (width, height) in (("384x256", (384, 256)), ("256x384", (256, 384))):  # WIDTHxHEIGHT
            response = fclient.post(URL, json=body(size=size))
            assert response.status_code == 200
            with Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))) as image:
                assert image.format == "PNG" and image.size == (width, height)
        response = fclient.post(URL, json=body(size="1000x1024"))
        assert response.status_code == 422
        [problem] = response.json()["error"]["errors"]
        assert problem["field"] == "size" and "multiple of 16" in problem["allowed"]


def test_closing_while_loading_stops_the_loader_before_it_warms(tiny_cpu_pipe):
    # In this order, whatever the machine's speed: the loader is inside the factory, close() begins the
    # shutdown, and only then does the factory return.
    entered, release = threading.Event(), threading.Event()

    def slow_factory():
        entered.set()
        assert release.wait(WAIT_S)
        return GatedPipe(tiny_cpu_pipe)

    def release_once_stopping():
        _wait_for(lambda: service.state == "stopping", "close() to begin the shutdown")
        release.set()

    service = make_service(slow_factory)
    service.start()
    assert entered.wait(WAIT_S), "the loader never called the factory"
    releaser = threading.Thread(target=release_once_stopping, daemon=True)
    releaser.start()
    service.close()  # waits for the loader, which sees the shutdown and does not warm
    releaser.join(WAIT_S)
    assert release.is_set()
    assert not service._loader.is_alive() and service.state == "stopped" and not service.ready
    assert service.pipe.calls == 0  # no warm-up ran


def test_the_app_takes_a_service_factory(tiny_cpu_pipe):
    # How a Ray Serve replica (or any host that builds the service late) uses the app.
    made = []

    def factory():
        made.append(make_service(tiny_cpu_pipe))
        return made[-1]

    app = create_app(factory)
    assert made == []  # nothing loads before the app starts
    with TestClient(app) as fclient:
        assert len(made) == 1 and made[0].wait_ready(WAIT_S)
        assert fclient.post(URL, json=body(seed=4)).json()["data"][0]["seed"] == 4
    assert made[0].state == "stopped"


@pytest.mark.slow  # a fresh interpreter importing the whole CLI: 10-30 s on a busy runner
def test_serve_help_shows_every_option_and_needs_no_serve_extra():
    # The CLI's parser (all commands) must not import the serve extra: block it and ask for the help.
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'sse_starlette', 'prometheus_client', 'starlette', 'pydantic'):\n"
            "    sys.modules[name] = None\n"
            "from zimage_trt.cli import main\n"
            "main(['serve', '--help'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--model", "--tiny", "--engine-dir", "--precision", "--device", "--size", "--allow-fallback",
                   "--host", "--port", "--api-key-file", "--max-queue", "--max-n", "--max-steps",
                   "--max-prompt-chars", "--max-body-bytes", "--timeout", "--log-level"):
        assert option in out.stdout, option
    assert "(default: 127.0.0.1)" in out.stdout and "(default: 8000)" in out.stdout
    assert out.stdout.count("(default:") >= 17  # every option shows its default


def test_a_request_no_engine_runs_is_a_422_that_does_not_show_the_servers_folders(tiny_cpu_pipe, caplog):
    from zimage_trt.engines.select import EngineNotFound

    gated = GatedPipe(tiny_cpu_pipe, fail_with=EngineNotFound("no engine in /srv/engines fits 256x256 batch 2"))
    service = make_service(gated)
    with TestClient(create_app(service)) as gclient, caplog.at_level(logging.WARNING, "zimage_trt.serving"):
        assert service.wait_ready(WAIT_S)
        response = gclient.post(URL, json=body(guidance_scale=2.0))
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "no_engine" and "/srv" not in response.text
        assert "guidance_scale > 0" in error["message"] and "use guidance_scale 0" in error["message"]
        assert any("/srv/engines" in record.getMessage() for record in caplog.records)  # the operator sees it
