"""OpenAI's images API on the wire: the error body of every refusal, the images response, the streaming
events and the model list. Apart from the generation itself, so that another endpoint (image edits)
answers in the same shapes with the same helpers.

Errors: `{"error": {"message", "type", "param", "code"}}` as OpenAI's, plus our `request_id` (also in
`X-Request-ID`) and, for a 422, `errors` (every field at fault: field, value, allowed, message). `type` is
OpenAI's class of error, from the status; `code` says what happened ("queue_full", "timeout", ...). The
statuses are the service's own (422 for a bad field, 429 for a full queue, 504 for a time-out); the
`openai` client raises the matching exception (UnprocessableEntityError, RateLimitError, ...). It retries
429 and 5xx by itself: a 500 or 504 carries `x-should-retry: false` (the same request would fail or queue
again), a 429 or 503 a `Retry-After`.
"""

from __future__ import annotations

import json
from typing import Callable

from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse

from .outcome import GeneratedImages, ServiceError, b64
from .schema import ImageRequest

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_NO_RETRY = (500, 504)
OWNER = "zimage-trt"


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, request_id: str, *, param: str | None = None,
               errors: list | None = None) -> dict:
    error = {"message": message, "type": error_type(status), "param": param, "code": code, "request_id": request_id}
    if errors:
        error["errors"] = errors
    return {"error": error}


def error_response(status: int, code: str, message: str, request_id: str, *, param: str | None = None,
                   errors: list | None = None, retry_after: float | None = None,
                   headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if status in _NO_RETRY:
        headers["x-should-retry"] = "false"
    return JSONResponse(error_body(status, code, message, request_id, param=param, errors=errors),
                        status_code=status, headers=headers)


def service_error_response(error: ServiceError, request_id: str) -> JSONResponse:
    return error_response(error.status, error.code, error.message, request_id, param=error.param,
                          errors=error.errors, retry_after=error.retry_after)


def error_event(error: ServiceError, request_id: str) -> dict:
    """A failure after a stream began: the same error object (the `openai` client raises it as APIError)."""
    return {"type": "error", "status": error.status,
            **error_body(error.status, error.code, error.message, request_id, param=error.param)}


def usage(prompt_tokens: int, image_tokens: int, input_image_tokens: int = 0) -> dict:
    """OpenAI's `usage`: the prompt's text tokens and the input images' tokens in (an edit's image and a
    control image, as the transformer sees them at the output size), the images' tokens (16x16-pixel
    patches) out."""
    given = prompt_tokens + input_image_tokens
    return {"input_tokens": given,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": input_image_tokens},
            "output_tokens": image_tokens, "total_tokens": given + image_tokens}


def _usage_of(result: GeneratedImages, images: int) -> dict:
    return usage(result.prompt_tokens, result.image_tokens * images, result.image_tokens * result.input_images)


def images_body(result: GeneratedImages, req: ImageRequest,
                link: Callable[[bytes, str], str] | None = None) -> dict:
    """The response body: OpenAI's ImagesResponse (data[].b64_json, or data[].url through `link`), plus
    each image's `seed`, the request's `timings`, `request_id` and `task` (which pipeline ran)."""
    data = []
    for image, seed in zip(result.images, result.seeds):
        item = {"url": link(image, result.media_type)} if link is not None else {"b64_json": b64(image)}
        data.append({**item, "seed": seed})
    return {
        "created": result.created, "data": data, "background": "opaque", "output_format": result.output_format,
        "size": result.size, "usage": _usage_of(result, len(result.images)),
        "timings": result.timings, "request_id": result.request_id, "task": result.task,
    }


def _event_fields(req: ImageRequest, created: int, size: str) -> dict:
    return {"created_at": created, "size": size, "quality": req.quality or "auto",
            "background": req.background or "auto", "output_format": req.image_format}


def partial_image_event(req: ImageRequest, preview: dict, created: int) -> dict:
    """`image_generation.partial_image` (`image_edit.partial_image` for an edit) from the service's
    `partial_image` event data (plus which image of the request it previews, `image_index`: OpenAI's
    numbering runs per image)."""
    return {"type": f"{req.event_prefix}.partial_image", "b64_json": preview["b64_json"],
            "partial_image_index": preview["partial_image_index"], **_event_fields(req, created, req.size),
            "image_index": preview["image"]}


def completed_events(result: GeneratedImages, req: ImageRequest) -> list[dict]:
    """One `image_generation.completed` (`image_edit.completed`) per image, each with its `usage` (and our
    `seed`, `image_index`)."""
    return [{"type": f"{req.event_prefix}.completed", "b64_json": b64(image),
             **_event_fields(req, result.created, result.size), "background": "opaque",
             "usage": _usage_of(result, 1), "image_index": index, "seed": seed}
            for index, (image, seed) in enumerate(zip(result.images, result.seeds))]


def sse(payload: dict) -> ServerSentEvent:
    """An OpenAI stream event: the SSE event name is the payload's `type`."""
    return ServerSentEvent(data=json.dumps(payload), event=payload["type"])


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}
