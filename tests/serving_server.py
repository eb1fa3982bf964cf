"""A real HTTP server over loopback for the browser and load tests: uvicorn in a thread of the test
process, in front of the tiny model's service (no second copy of torch to import)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.parse

import uvicorn

from zimage_trt.serving.command import serving_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_with_host(url: str, path: str, host: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """(status, body) of a GET whose Host header is `host`, whatever the address connected to (as a page
    on a rebound name would send it)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def running_server(pipe, sizes=("256x256",), api_key=None, wait_s: float = 120.0, app_settings=None, **settings):
    """Yields (base url, service); stops the server and the service on exit. The app is the one `zimage-trt
    serve` runs on 127.0.0.1 (its key, and without one its host-name rule); `app_settings`: other
    AppSettings fields (image links)."""
    service = ImageService(pipe, ServiceSettings(limits=ServingLimits(sizes=tuple(sizes)), warm_steps=1, **settings))
    with running_app(serving_app(service, api_key, "127.0.0.1", **(app_settings or {})), service, wait_s) as url:
        yield url, service


@contextlib.contextmanager
def running_app(app, service, wait_s: float = 120.0):
    """Serves `app` (over `service`) with uvicorn on a free loopback port; yields its base url once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not (server.started and service.ready):
        if service.state == "failed" or not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"test server did not start: state {service.state}, {service.failure}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(wait_s)
