"""What a request comes to besides its images: the errors a client sees, the pipeline's own argument
checks run before queueing, and the bytes and JSON sent back."""

from __future__ import annotations

import base64
import io
import math

from ..request import DEFAULT_MAX_SEQUENCE_LENGTH, RequestLimits, check_request
from .schema import ImageGenerationRequest, safe_value

# How the pipeline's own argument names appear in the API (its errors start with the argument's name).
_API_FIELD = {"prompt": "prompt", "negative_prompt": "negative_prompt", "height": "size", "width": "size",
              "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}


class ServiceError(Exception):
    """An answer other than an image: an HTTP status, an error type, a message safe to show a client."""

    def __init__(self, status: int, type: str, message: str, retry_after: float | None = None,
                 errors: list[dict] | None = None):
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.retry_after = retry_after
        self.errors = errors or []


def check_with_pipeline(pipe, req: ImageGenerationRequest) -> None:
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
        raise ServiceError(422, "invalid_request", message, errors=[{
            "field": api_name, "value": safe_value(value), "allowed": message, "message": message}]) from None


def encode_png(image, compress_level: int = 1) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


