"""What a request comes to: the errors a client sees (`ServiceError`), a body's fields validated
(`parsed`), the pipeline's own argument checks run before queueing, the images encoded
(`GeneratedImages`), JSON without NaN, and the stats per task."""

from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..model.shapes import Resolution
from ..request import DEFAULT_MAX_SEQUENCE_LENGTH, RequestLimits, check_request
from ..runtime.telemetry import summarize
from .schema import OUTPUT_FORMATS, ImageRequest, parse_request, safe_value, validation_errors

# How the pipeline's own argument names appear in the API (its errors start with the argument's name).
_API_FIELD = {"prompt": "prompt", "negative_prompt": "negative_prompt", "height": "size", "width": "size",
              "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}


class ServiceError(Exception):
    """An answer other than an image: an HTTP status, a code (what went wrong, e.g. "queue_full"), a
    message safe to show a client, and the field it is about (`param`) where there is one."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 errors: list[dict] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after
        self.errors = errors or []
        self.param = param if param is not None else (self.errors[0]["field"] if self.errors else None)


@dataclass
class GeneratedImages:
    """A request's images, encoded, and what the response says about them (openai_api.py shapes it)."""

    request_id: str
    images: list[bytes]  # encoded in `output_format`
    output_format: str  # png | jpeg | webp
    seeds: list[int]
    size: str  # WIDTHxHEIGHT
    timings: dict
    prompt_tokens: int  # the prompt's tokens (the pipeline's tokenizer, no chat template), for `usage`
    input_images: int = 0  # images the request brought (an edit's image, a control image), for `usage`
    task: str = "text-to-image"  # which pipeline ran (family.py)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def media_type(self) -> str:
        return OUTPUT_FORMATS[self.output_format]

    @property
    def image_tokens(self) -> int:
        """Tokens of one image as the transformer sees it: one per 16x16-pixel patch."""
        return Resolution.parse(self.size).image_tokens


def parsed(model: type[ImageRequest], body) -> ImageRequest:
    """The validated request, or a ServiceError 422 whose message names each field at fault and what it
    may be (its `errors`: field, value, allowed, message for each)."""
    try:
        return parse_request(model, body)
    except ValidationError as error:
        problems = validation_errors(error, model)
        message = "invalid field(s): " + "; ".join(f"{p['field']}: {p['allowed']}" for p in problems)
        raise ServiceError(422, "invalid_value", message, errors=problems) from None


def check_with_pipeline(pipe, req: ImageRequest) -> None:
    """The pipeline's own argument checks, run before queueing (so a bad request costs no queue slot)."""
    try:
        limits = RequestLimits(pipe.caption_feature_dim, pipe.max_caption_tokens, pipe.latent_channels,
                               pipe.image_processor.config.vae_scale_factor)
    except AttributeError:  # not a ZImageTRTPipeline (e.g. a stand-in): it checks its own calls
        return
    resolution = req.resolution
    try:
        check_request(limits, prompt=req.prompt, negative_prompt=req.negative_prompt, prompt_embeds=None,
                      negative_prompt_embeds=None, height=resolution.height, width=resolution.width,
                      num_inference_steps=req.num_inference_steps, sigmas=None, guidance_scale=req.guidance_scale,
                      cfg_normalization=False, cfg_truncation=1.0, num_images_per_prompt=1,
                      max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH, output_type="pil",
                      callback_on_step_end=None, callback_on_step_end_tensor_inputs=[], generator=None,
                      latents=None)
    except (ValueError, TypeError) as error:
        message = safe_value(str(error))
        name = message.split(" ", 1)[0]
        api_name = _API_FIELD.get(name, "(body)")
        value = getattr(req, api_name, None) if api_name != "(body)" else None
        raise ServiceError(422, "invalid_value", message, errors=[{
            "field": api_name, "value": safe_value(value), "allowed": message, "message": message}]) from None


def encode_image(image, output_format: str = "png", compression: int = 100, png_compress_level: int = 1) -> bytes:
    """The image as a file: PNG (lossless; `png_compress_level` trades bytes for time), or JPEG / WebP
    at quality `compression` (OpenAI's `output_compression`, 0-100, 100 the best)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=int(compression))
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=int(compression))
    else:
        raise ValueError(f"output_format {output_format!r} is not one of {sorted(OUTPUT_FORMATS)}")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_finite(value):
    """NaN and infinities (an empty latency summary is all NaN) become null: JSON has no word for them.
    The one such helper of serving/: a service's stats and timings, and the replicas' merged stats."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(v) for v in value]
    return value


def task_summary(served, history) -> dict:
    """/v1/stats' `tasks`: the tasks this server runs, and for each the recent requests (the service's
    history), their images and per-image latency (merged replicas' too)."""
    by_task: dict[str, list[dict]] = {}
    for entry in history:
        by_task.setdefault(entry["task"], []).append(entry)
    return {"served": list(served),
            "recent": {task: {"requests": len(entries), "images": sum(e["n"] for e in entries),
                              "per_image_ms": summarize(e["per_image_ms"] for e in entries)}
                       for task, entries in by_task.items()}}
