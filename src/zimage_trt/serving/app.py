"""`create_app`: the HTTP API and the dashboard in front of one `ImageService` (FastAPI / Starlette).

    POST /v1/images/generations      OpenAI's images API (openai_api.py); `"stream": true` in the body answers
                                     OpenAI's server-sent events, `?stream=true` our progress events; with
                                     --controlnet a `control_image` (base64) runs the ControlNet
    POST /v1/images/edits            OpenAI's multipart edit (edits.py): image to image, or inpainting with a
                                     `mask`; the same answers, streams, limits and queue
    GET  /v1/images/files/NAME       an image answered by link (`response_format: "url"`; image_store.py)
    GET  /v1/models, /v1/models/ID   the served model, as OpenAI lists models
    GET  /healthz  /readyz           live; loaded and warmed
    GET  /v1/stats                   the dashboard's data (queue with ETAs, latencies, GPU, pipe.stats())
    GET  /metrics                    Prometheus text format
    GET  /                           the dashboard (dashboard.html + dashboard.js, no CDN)

With an API key set, /v1/* and /metrics need `Authorization: Bearer KEY` (compared in constant time);
/healthz, /readyz and the dashboard page itself (static: it asks for the key and sends it) do not.
Every answer carries `X-Request-ID`; a failure is logged server-side under it and the client gets only
the id and a message, never a stack trace. Every error, whatever the path, is OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from . import openai_api
from .edits import decode_edit, open_control_image, read_edit
from .family import TaskImages, no_controlnet
from .image_store import ImageStore
from .openai_api import error_response, service_error_response
from .outcome import parsed
from .schema import ImageEditRequest, ImageGenerationRequest, ImageRequest, request_model
from .service import ImageService, ServiceError

log = logging.getLogger("zimage_trt.serving")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"


@dataclass
class AppSettings:
    api_key: str | None = None  # None: no key (only allowed on a loopback address; see settings.check_bind)
    max_body_bytes: int | None = None  # default: the service's limits.max_body_bytes
    sse_ping_s: float = 15.0  # keeps proxies from closing a stream that waits in the queue
    # Host names the server answers to (None: any). Without a key on loopback, a web page whose own
    # name is rebound to 127.0.0.1 (DNS rebinding) would otherwise reach the API from the browser.
    allowed_hosts: tuple[str, ...] | None = None
    # `response_format: "url"`: images kept in memory for links (0: links refused, e.g. under Ray Serve,
    # where the replica asked for a link need not be the one that made the image).
    url_max_images: int = 64
    url_ttl_s: float = 3600.0  # OpenAI's links last an hour too


class _RequestIdAndBodyLimit:
    """ASGI middleware: a request id for every request (in `scope["state"]` and `X-Request-ID`), and a
    413 for a body over the limit (declared or streamed), before the app reads it. `body_limit(path)`: the
    limit of a path (a body with images may be larger than a JSON one)."""

    def __init__(self, app, body_limit: Callable[[str], int], allowed_hosts: tuple[str, ...] | None = None):
        self.app, self.body_limit = app, body_limit
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
            refused = error_response(421, "unknown_host", "this server answers only to the host names "
                                     f"{sorted(self.allowed_hosts)}", request_id)
            return await refused(scope, receive, send_with_id)
        limit = self.body_limit(scope.get("path", ""))
        too_large = error_response(413, "body_too_large", f"the request body is over {limit} bytes", request_id)
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

    def body_limit(path: str) -> int:
        """A JSON body's limit; an edit's, or a generation's on a ControlNet server, may hold images."""
        service = holder["service"]
        if service is None:
            return settings.max_body_bytes or 64 * 1024
        limits = service.limits
        plain = settings.max_body_bytes or limits.max_body_bytes
        with_images = path == EDITS or (path == GENERATIONS and service.takes_control_images)
        return max(plain, limits.upload_body_bytes) if with_images else plain

    app.add_middleware(_RequestIdAndBodyLimit, body_limit=body_limit, allowed_hosts=settings.allowed_hosts)
    models: dict = {}
    store = app.state.image_store = ImageStore(settings.url_max_images, settings.url_ttl_s)
    started = int(time.time())

    def current() -> ImageService:
        return holder["service"]

    def request_id(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    def refused(request: Request) -> JSONResponse | None:
        """401 without the key; 503 while a service factory has not run yet."""
        if (denied := unauthorized(request)) is not None:
            return denied
        if current() is None:
            return error_response(503, "not_ready", "the service is loading; retry later", request_id(request),
                                  retry_after=5)
        return None

    def unauthorized(request: Request) -> JSONResponse | None:
        if key is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key):
            return None
        return error_response(401, "invalid_api_key", "this server needs its API key: send the header "
                              "'Authorization: Bearer KEY'", request_id(request), headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), "value": str(e.get("input"))[:200],
                   "allowed": e["msg"], "message": e["msg"]} for e in error.errors()]
        message = "invalid query parameter(s): " + "; ".join(f"{e['field']}: {e['allowed']}" for e in errors)
        return error_response(422, "invalid_value", message, request_id(request), param=errors[0]["field"],
                              errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return error_response(error.status_code, code, message, request_id(request), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=error)
        return error_response(500, "internal_error", f"internal error; the server log has the details under "
                              f"request id {rid}", rid)

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

    @app.get("/v1/models")
    async def list_models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return openai_api.model_list(current().limits.model_id, started)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        if (denied := refused(request)) is not None:
            return denied
        served = current().limits.model_id
        if model_id != served:
            return error_response(404, "model_not_found", f"the model {model_id!r} is not served here; this "
                                  f"server serves {served!r}", request_id(request), param="model")
        return openai_api.model_card(served, started)

    @app.get("/v1/images/files/{name}", name="image_file")
    async def image_file(request: Request, name: str):
        if (denied := unauthorized(request)) is not None:
            return denied
        image = store.get(name)
        if image is None:
            return error_response(404, "image_not_found", f"no image {name[:64]!r} here: a link lasts "
                                  f"{store.ttl_s:g} s, and only the {store.max_images} latest images are kept; "
                                  f"ask again, or use response_format 'b64_json'", request_id(request))
        return Response(image.data, media_type=image.media_type, headers={"Cache-Control": "private, max-age=60"})

    def link_maker(request: Request):
        def link(data: bytes, media_type: str) -> str:
            return str(request.url_for("image_file", name=store.put(data, media_type)))

        return link

    @app.post(GENERATIONS)
    async def generations(request: Request, stream: bool = False):
        return await counted(request, _generations, stream)

    @app.post(EDITS)
    async def edits(request: Request, stream: bool = False):
        return await counted(request, _edits, stream)

    async def counted(request: Request, handler, stream: bool) -> Response:
        rid = request_id(request)
        if (denied := refused(request)) is not None:
            return denied
        service = current()
        response = await handler(request, service, rid, stream, models, settings, store, link_maker(request))
        service.metrics.http_requests.labels(status=str(response.status_code)).inc()
        return response

    return app


def _request_model(models: dict, limits, base) -> type:
    key = (id(limits), base)
    if key not in models:
        models[key] = request_model(limits, base)
    return models[key]


async def _generations(request: Request, service: ImageService, rid: str, progress: bool, models: dict,
                       settings: AppSettings, store: ImageStore, link) -> Response:
    body = await json_body(request, rid)
    if isinstance(body, Response):
        return body
    req = parse_or_refuse(_request_model(models, service.limits, ImageGenerationRequest), body, rid)
    if isinstance(req, Response):
        return req
    refusal = refused_early(req, rid, store, progress)
    if refusal is not None:
        return refusal
    images = None
    if req.control_image is not None:
        try:
            images = await control_images(service, req)
        except ServiceError as error:
            return service_error_response(error, rid)
        req = req.model_copy(update={"control_image": None})  # (decoded: the text need not wait in the queue)
    return await answer(service, req, rid, settings, store, link, progress, images)


async def control_images(service: ImageService, req: ImageGenerationRequest) -> TaskImages:
    """A generation's base64 control image, decoded and at the request's size."""
    if not service.takes_control_images:
        raise no_controlnet()
    family, limits, resolution = service.task_family(), service.limits, req.resolution

    def decode() -> TaskImages:
        control = open_control_image(req.control_image, limits)
        return family.fit(TaskImages(control_image=control), resolution.height, resolution.width)

    return await asyncio.to_thread(decode)


async def _edits(request: Request, service: ImageService, rid: str, progress: bool, models: dict,
                 settings: AppSettings, store: ImageStore, link) -> Response:
    try:
        req, files = await read_edit(request, _request_model(models, service.limits, ImageEditRequest), service)
        refusal = refused_early(req, rid, store, progress)
        if refusal is not None:
            return refusal
        req, images = await decode_edit(req, files, service)
    except ServiceError as error:
        return service_error_response(error, rid)
    return await answer(service, req, rid, settings, store, link, progress, images)


def refused_early(req: ImageRequest, rid: str, store: ImageStore, progress: bool) -> Response | None:
    """The refusals that need no image: answered before an upload is decoded."""
    if progress and req.stream:
        return error_response(422, "invalid_value", "ask for one stream: 'stream': true in the body (OpenAI's "
                              "events) or ?stream=true (progress events), not both", rid, param="stream")
    if req.response_format == "url" and not store.enabled:
        return error_response(422, "invalid_value", "this server keeps no images for links: use response_format "
                              "'b64_json'", rid, param="response_format")
    return None


async def json_body(request: Request, rid: str):
    """The request's JSON body, or the 415 / 400 answer."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        # Also what keeps another site's page from posting here: a JSON body needs a CORS preflight.
        return error_response(415, "unsupported_media_type", "send the body as JSON with "
                              "'Content-Type: application/json'", rid)
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return error_response(400, "invalid_json", f"the body is not JSON: {getattr(error, 'msg', error)}", rid)


def parse_or_refuse(model: type[ImageRequest], body, rid: str):
    """The validated request, or a 422 whose message names each field at fault and what it may be."""
    try:
        return parsed(model, body)
    except ServiceError as error:
        return service_error_response(error, rid)


async def answer(service: ImageService, req: ImageRequest, rid: str, settings: AppSettings,
                 store: ImageStore, link, progress: bool, images: TaskImages | None = None) -> Response:
    """Run `req` (with an edit's or a ControlNet request's `images`) and answer: OpenAI's images response,
    OpenAI's stream (`stream: true` in the body), or our progress events (`?stream=true`, the dashboard's);
    `refused_early` has passed it."""
    link = link if req.response_format == "url" else None
    if not (req.stream or progress):
        try:
            result = await service.generate(req, rid, images)
        except ServiceError as error:
            return service_error_response(error, rid)
        return JSONResponse(openai_api.images_body(result, req, link))
    events = service.stream(req, rid, progress=progress, images=images)
    try:
        first = await events.__anext__()  # queues the request: a refusal is still a plain HTTP error here
    except ServiceError as error:
        return service_error_response(error, rid)
    events_of = _progress_events if progress else _openai_events

    def convert(event, req: ImageRequest, rid: str, link) -> list[ServerSentEvent]:
        if event.event == "error":
            return [ServerSentEvent(data=json.dumps(openai_api.error_event(event.data, rid)), event="error")]
        return events_of(event, req, link)

    async def send():
        try:
            for item in convert(first, req, rid, link):
                yield item
            async for event in events:
                for item in convert(event, req, rid, link):
                    yield item
        finally:
            await events.aclose()  # a client gone mid-stream: its request is dropped at once

    return EventSourceResponse(send(), ping=settings.sse_ping_s, headers={"Cache-Control": "no-store"})


def _progress_events(event, req: ImageRequest, link) -> list[ServerSentEvent]:
    if event.event == "done":
        return [ServerSentEvent(data=json.dumps(openai_api.images_body(event.data, req, link)), event="done")]
    return [ServerSentEvent(data=json.dumps(event.data), event=event.event)]


def _openai_events(event, req: ImageRequest, link) -> list[ServerSentEvent]:
    """OpenAI's events only: previews, then one `image_generation.completed` per image (queue and step
    events are ours, for the progress stream)."""
    if event.event == "partial_image":
        return [openai_api.sse(openai_api.partial_image_event(req, event.data, int(time.time())))]
    if event.event == "done":
        return [openai_api.sse(payload) for payload in openai_api.completed_events(event.data, req)]
    return []


def _package_text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
