"""`create_app`: the HTTP API and the dashboard in front of one `ImageService` (FastAPI / Starlette).

    POST /v1/images/generations      OpenAI images shape; `?stream=true` answers server-sent events
    GET  /healthz  /readyz           live; loaded and warmed
    GET  /v1/stats                   the dashboard's data (queue with ETAs, latencies, GPU, pipe.stats())
    GET  /metrics                    Prometheus text format
    GET  /                           the dashboard (dashboard.html + dashboard.js, no CDN)

With an API key set, /v1/* and /metrics need `Authorization: Bearer KEY` (compared in constant time);
/healthz, /readyz and the dashboard page itself (static: it asks for the key and sends it) do not.
Every answer carries `X-Request-ID`; a failure is logged server-side under it and the client gets only
the id and a message, never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import HTMLResponse, JSONResponse, Response

from .schema import parse_request, request_model, validation_errors
from .service import ImageService, ServiceError

log = logging.getLogger("zimage_trt.serving")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class AppSettings:
    api_key: str | None = None  # None: no key (only allowed on a loopback address; see settings.check_bind)
    max_body_bytes: int | None = None  # default: the service's limits.max_body_bytes
    sse_ping_s: float = 15.0  # keeps proxies from closing a stream that waits in the queue
    # Host names the server answers to (None: any). Without a key on loopback, a web page whose own
    # name is rebound to 127.0.0.1 (DNS rebinding) would otherwise reach the API from the browser.
    allowed_hosts: tuple[str, ...] | None = None


def error_body(status: int, type: str, message: str, request_id: str, errors: list | None = None) -> dict:
    return {"error": {"type": type, "message": message, "request_id": request_id, "errors": errors or []}}


def _error(error: ServiceError, request_id: str) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after is not None else None
    return JSONResponse(error_body(error.status, error.type, error.message, request_id, error.errors),
                        status_code=error.status, headers=headers)


class _RequestIdAndBodyLimit:
    """ASGI middleware: a request id for every request (in `scope["state"]` and `X-Request-ID`), and a
    413 for a body over the limit (declared or streamed), before the app reads it."""

    def __init__(self, app, max_body_bytes: int, allowed_hosts: tuple[str, ...] | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts} if allowed_hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            refused = JSONResponse(error_body(421, "unknown_host", "this server answers only to the host names "
                                              f"{sorted(self.allowed_hosts)}", request_id), status_code=421)
            return await refused(scope, receive, send_with_id)
        limit = self.max_body_bytes
        too_large = JSONResponse(error_body(413, "body_too_large", f"the request body is over {limit} bytes",
                                            request_id), status_code=413)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await too_large(scope, receive, send_with_id)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send_with_id)


class _BodyTooLarge(Exception):
    pass


def _host_name(header: bytes) -> str:
    """The name in a Host header, without the port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(service: ImageService | Callable[[], ImageService], settings: AppSettings | None = None) -> FastAPI:
    """The ASGI app over `service` (or a factory of one, called at startup). The app starts the service
    (load and warm in a thread: /readyz says when done) and closes it gracefully at shutdown."""
    settings = settings or AppSettings()
    holder: dict = {"service": service if isinstance(service, ImageService) else None}
    factory = None if isinstance(service, ImageService) else service
    key = settings.api_key.encode() if settings.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if holder["service"] is None:
            holder["service"] = await asyncio.to_thread(factory)
        holder["service"].start()
        try:
            yield
        finally:
            await asyncio.to_thread(holder["service"].close, True)

    app = FastAPI(title="zimage-trt", lifespan=lifespan, docs_url=None, redoc_url=None)  # the docs pages use a CDN
    first = holder["service"]
    limits = first.limits if first is not None else None
    max_body = settings.max_body_bytes or (limits.max_body_bytes if limits is not None else 64 * 1024)
    app.add_middleware(_RequestIdAndBodyLimit, max_body_bytes=max_body, allowed_hosts=settings.allowed_hosts)
    models: dict = {}

    def current() -> ImageService:
        return holder["service"]

    def request_id(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    def refused(request: Request) -> JSONResponse | None:
        """401 without the key; 503 while a service factory has not run yet."""
        if (denied := unauthorized(request)) is not None:
            return denied
        if current() is None:
            return JSONResponse(error_body(503, "not_ready", "the service is loading; retry later", request_id(request)),
                                status_code=503, headers={"Retry-After": "5"})
        return None

    def unauthorized(request: Request) -> JSONResponse | None:
        if key is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key):
            return None
        return JSONResponse(error_body(401, "unauthorized", "this server needs an API key: send the header "
                                       "'Authorization: Bearer KEY'", request_id(request)), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), "value": str(e.get("input"))[:200],
                   "allowed": e["msg"], "message": e["msg"]} for e in error.errors()]
        return JSONResponse(error_body(422, "invalid_request", "invalid query parameters", request_id(request),
                                       errors), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=error)
        return JSONResponse(error_body(500, "internal_error", f"internal error; the server log has the details "
                                       f"under request id {rid}", rid), status_code=500)

    @app.get("/healthz")
    async def healthz():
        state = current().state if current() is not None else "loading"
        status = 503 if state == "failed" else 200
        return JSONResponse({"status": "failed" if status == 503 else "ok", "state": state}, status_code=status)

    @app.get("/readyz")
    async def readyz():
        service = current()
        shared = service.unready_reason() if service is not None and service.ready else None
        if shared is not None:  # --not-ready-when-shared: a load balancer sends the traffic elsewhere
            return JSONResponse({"ready": False, "state": service.state, "reason": shared}, status_code=503,
                                headers={"Retry-After": "5"})
        if service is not None and service.ready:
            return {"ready": True, "state": service.state, "sizes": list(service.limits.sizes)}
        state = service.state if service is not None else "loading"
        return JSONResponse({"ready": False, "state": state}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/v1/stats")
    async def stats(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return await asyncio.to_thread(current().stats)

    @app.get("/metrics")
    async def metrics(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        body = await asyncio.to_thread(current().metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(_package_text("dashboard.html"))

    @app.get("/dashboard.js")
    async def dashboard_js():
        return Response(_package_text("dashboard.js"), media_type="text/javascript; charset=utf-8")

    @app.post("/v1/images/generations")
    async def generations(request: Request, stream: bool = False):
        rid = request_id(request)
        if (denied := refused(request)) is not None:
            return denied
        service = current()
        response = await _generations(request, service, rid, stream, models, settings)
        service.metrics.http_requests.labels(status=str(response.status_code)).inc()
        return response

    return app


async def _generations(request: Request, service: ImageService, rid: str, stream: bool, models: dict,
                       settings: AppSettings) -> Response:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        # Also what keeps another site's page from posting here: a JSON body needs a CORS preflight.
        return JSONResponse(error_body(415, "unsupported_media_type", "send the body as JSON with "
                                       "'Content-Type: application/json'", rid), status_code=415)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return JSONResponse(error_body(400, "invalid_json", f"the body is not JSON: {error.msg if hasattr(error, 'msg') else error}",
                                       rid), status_code=400)
    model = models.get(id(service.limits))
    if model is None:
        model = models[id(service.limits)] = request_model(service.limits)
    try:
        req = parse_request(model, body)
    except ValidationError as error:
        problems = [p.model_dump() for p in validation_errors(error)]
        fields = ", ".join(sorted({p["field"] for p in problems}))
        return JSONResponse(error_body(422, "invalid_request", f"invalid field(s): {fields}", rid, problems),
                            status_code=422)
    if not stream:
        try:
            return JSONResponse(await service.generate(req, rid))
        except ServiceError as error:
            return _error(error, rid)
    events = service.stream(req, rid)
    try:
        first = await events.__anext__()  # queues the request: a refusal is still a plain HTTP error here
    except ServiceError as error:
        return _error(error, rid)

    async def send():
        try:
            yield ServerSentEvent(data=json.dumps(first.data), event=first.event)
            async for event in events:
                yield ServerSentEvent(data=json.dumps(event.data), event=event.event)
        finally:
            await events.aclose()  # a client gone mid-stream: its request is dropped at once

    return EventSourceResponse(send(), ping=settings.sse_ping_s, headers={"Cache-Control": "no-store"})


def _package_text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
