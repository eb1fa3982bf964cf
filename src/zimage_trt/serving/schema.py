"""The HTTP API's request and response shapes: OpenAI's images API, plus our seed, steps and timings.

    POST /v1/images/generations
    {"prompt": "...", "size": "1536x1024", "n": 1, "model": "z-image-turbo", "output_format": "png",
     "response_format": "b64_json",                         # OpenAI's fields
     "seed": 7, "num_inference_steps": 8, "guidance_scale": 0.0, "negative_prompt": null}   # ours
    -> {"created": 1764140000, "data": [{"b64_json": "...", "seed": 7}], "size": "1536x1024",
        "output_format": "png", "background": "opaque", "usage": {...}, "timings": {...}, "request_id": "..."}

    POST /v1/images/edits   multipart/form-data: the files `image` (and `mask`), the rest as form fields
    (`ImageEditRequest`: OpenAI's fields, plus `strength` and the extras above; edits.py reads the form)

Sizes are WIDTHxHEIGHT, as OpenAI's (`1536x1024` is landscape); `"auto"` is the server's first size for a
generation, and for an edit the uploaded image's own size snapped to a served one (edits.py).
OpenAI's `quality`, `style`, `moderation`, `user`, `safety_identifier` and `complexity` are accepted (with
OpenAI's values) and do not change the image: one model, one quality. `background: "transparent"` is
refused (the model makes opaque images). With a server started with `--controlnet`, a generation may carry
`control_image` (a PNG, JPEG or WebP file in base64; uploads.py reads it). Our extras are top-level fields (the `openai` client sends
them through `extra_body`).

`request_model(limits)` gives the request model for one server's limits (the sizes its engines serve,
the largest n, steps, prompt length, the served model id): a wrong field is refused before anything is
queued, and `validation_errors` turns pydantic's errors into 422 details that name the field, the value
and what is allowed. What the pipeline checks itself (a size's sides, prompt text that is not valid
Unicode, ...) is not spelled again here: `Resolution` and `request.check_request` run on the parsed request.

No field names a file: there is no way to make the server read or write a path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..model.shapes import Resolution
from ..request import TURBO_GUIDANCE, TURBO_STEPS

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MODEL_ID = "z-image-turbo"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_PARTIAL_IMAGES = 3


@dataclass(frozen=True)
class ServingLimits:
    """What one server accepts. `sizes` empty (with `any_size`) means every size the model takes."""

    sizes: tuple[str, ...] = ("1024x1024",)
    any_size: bool = False  # allow_fallback: sizes without an engine run eager torch (slow, but correct)
    max_n: int = 4
    max_steps: int = 50
    max_guidance: float = 20.0
    max_prompt_chars: int = 4000
    max_body_bytes: int = 64 * 1024  # a JSON body without images
    # A body with images (an edit's multipart form; a generation with a control image): OpenAI takes files
    # of up to 50 MB; a 2048x2048 photo is about 10 MB as PNG.
    max_upload_bytes: int = 32 * 2**20
    # Pixels of one uploaded image, read from its header before it is decoded (a small file can claim a huge
    # canvas: a decompression bomb); 2^25 is 8192x4096, above any camera's photo most users have.
    max_image_pixels: int = 2**25
    model_id: str = MODEL_ID

    @property
    def upload_body_bytes(self) -> int:
        """The limit of a body that holds images (never below a plain JSON body's)."""
        return max(self.max_upload_bytes, self.max_body_bytes)

    def __post_init__(self):
        for name in ("max_n", "max_steps", "max_prompt_chars", "max_body_bytes", "max_upload_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.sizes and not self.any_size:
            raise ValueError("sizes is empty: name at least one WIDTHxHEIGHT the engines serve, or allow any size")
        if not isinstance(self.model_id, str) or not _MODEL_NAME.fullmatch(self.model_id):
            raise ValueError(f"model name {self.model_id!r}: use 1 to 64 letters, digits and . _ : / - "
                             f"(starting with a letter or digit), e.g. {MODEL_ID!r}")
        object.__setattr__(self, "sizes", tuple(Resolution.parse(s).key for s in self.sizes))

    @property
    def default_size(self) -> str:
        return self.sizes[0] if self.sizes else "1024x1024"


class ImageRequest(BaseModel):
    """What a generation and an edit both take; unknown fields are refused (a typo must not be silently
    ignored)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    auto_size: ClassVar[str | None] = "1024x1024"  # what size "auto" means (None: kept, resolved later)
    event_prefix: ClassVar[str] = "image_generation"  # OpenAI's stream event types: image_generation.completed
    upload_fields: ClassVar[tuple[str, ...]] = ()  # fields sent as files (multipart), outside the model

    prompt: str = Field(min_length=1, max_length=4000, description="what to draw")
    model: str | None = Field(None, description="the served model's id (GET /v1/models), if given")
    n: int = Field(1, ge=1, le=4, description="images; image i uses seed + i")
    size: str = Field("1024x1024", description="WIDTHxHEIGHT in pixels, as OpenAI's (1536x1024 is landscape), "
                                               "or 'auto' (the server's first size)")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default): the image in the body; url: a link to it, kept for a while")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality 0-100 (default "
                                           "100); png is lossless and ignores it")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="the images are opaque: 'transparent' is refused")
    stream: bool | None = Field(None, description="true: server-sent events, as OpenAI's: partial images, then "
                                "the images (image_generation.* for a generation, image_edit.* for an edit)")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="previews of the image so far per image, when streaming")
    # Accepted as OpenAI's, and ignored: one model, one quality, no moderation model, nothing logged per user.
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None, description="ignored")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="ignored")
    user: str | None = Field(None, max_length=256, description="ignored")
    safety_identifier: str | None = Field(None, max_length=256, description="ignored")
    # Ours (the openai client: extra_body={...}).
    negative_prompt: str | None = Field(None, max_length=4000, description="what to steer away from (needs guidance_scale > 0)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 64, description="seed of the first image's noise; default: random")
    num_inference_steps: int = Field(TURBO_STEPS, ge=1, le=50, description="denoising steps (Turbo: 8)")
    guidance_scale: float = Field(TURBO_GUIDANCE, ge=0.0, le=20.0, allow_inf_nan=False,
                                  description="classifier-free guidance (Turbo: 0)")

    @field_validator("size")
    @classmethod
    def _size_is_a_resolution(cls, value: str) -> str:
        if value == "auto":
            return cls.auto_size or value
        return Resolution.parse(value).key  # its error says what a size must look like

    @field_validator("background")
    @classmethod
    def _opaque_only(cls, value):
        if value == "transparent":
            raise ValueError("background 'transparent' is not available: this model makes opaque images; "
                             "leave it out, or use 'auto' or 'opaque'")
        return value

    @property
    def resolution(self) -> Resolution:
        return Resolution.parse(self.size)

    @property
    def image_format(self) -> str:
        return self.output_format or "png"

    @property
    def compression(self) -> int:
        return 100 if self.output_compression is None else self.output_compression

    @property
    def previews(self) -> int:
        """Partial images per image: only a streaming request gets them."""
        return (self.partial_images or 0) if self.stream else 0


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations."""

    style: Literal["vivid", "natural"] | None = Field(None, description="ignored")
    moderation: Literal["low", "auto"] | None = Field(None, description="ignored")
    # Ours: on a server started with --controlnet, the ControlNet's control image (pose, edges, depth...).
    control_image: str | None = Field(None, description="a PNG, JPEG or WebP file in base64 (a data: URL too); "
                                      "needs a server started with --controlnet")


class ImageEditRequest(ImageRequest):
    """POST /v1/images/edits' form fields (the files `image`, `mask` and `control_image` are read apart).
    Without a mask: image to image; with one: inpainting (or ControlNet inpainting with `control_image`)."""

    auto_size: ClassVar[str | None] = None  # the image's own size, snapped to a served one (edits.py)
    event_prefix: ClassVar[str] = "image_edit"
    upload_fields: ClassVar[tuple[str, ...]] = ("image", "mask", "control_image")

    size: str = Field("auto", description="WIDTHxHEIGHT in pixels, or 'auto' (the image's own size, snapped to a "
                                          "served one)")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="ignored")
    # Ours.
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="how much of the image to repaint, 0..1 (default: 0.6 without a mask, "
                                               "1.0 with one, as diffusers); not with control_image")


def request_model(limits: ServingLimits, base: type[ImageRequest] = ImageGenerationRequest) -> type[ImageRequest]:
    """`base` (a generation's or an edit's request) narrowed to one server's limits (so its OpenAPI schema
    shows them too)."""
    size_type: Any = str if limits.any_size else Literal[(*limits.sizes, "auto")]  # type: ignore[valid-type]
    default_size = "auto" if base.auto_size is None else limits.default_size
    chars = limits.max_prompt_chars
    model = create_model(
        base.__name__,
        __base__=base,
        prompt=(str, Field(min_length=1, max_length=chars, description="what to draw")),
        negative_prompt=(str | None, Field(None, max_length=chars, description="what to steer away from")),
        size=(size_type, Field(default_size, description="WIDTHxHEIGHT in pixels, or 'auto'")),
        n=(int, Field(1, ge=1, le=limits.max_n, description="images; image i uses seed + i")),
        num_inference_steps=(int, Field(TURBO_STEPS, ge=1, le=limits.max_steps, description="denoising steps")),
        guidance_scale=(float, Field(TURBO_GUIDANCE, ge=0.0, le=limits.max_guidance, allow_inf_nan=False,
                                     description="classifier-free guidance (Turbo: 0)")),
        model=(Literal[limits.model_id] | None, Field(None, description="the served model's id, if given")),
    )
    if base.auto_size is not None:
        model.auto_size = limits.default_size
    return model


@dataclass
class StreamEvent:
    """One event of `ImageService.stream`: `queued`, `started`, `step`, `partial_image`, `done` (its data a
    `GeneratedImages`) or `error`."""

    event: str
    data: Any = field(default_factory=dict)


# -- 422 bodies ------------------------------------------------------------------------------------
_ALLOWED_FROM_CONTEXT = {
    "less_than_equal": lambda c: f"<= {c['le']}",
    "less_than": lambda c: f"< {c['lt']}",
    "greater_than_equal": lambda c: f">= {c['ge']}",
    "greater_than": lambda c: f"> {c['gt']}",
    "string_too_long": lambda c: f"at most {c['max_length']} characters",
    "string_too_short": lambda c: f"at least {c['min_length']} character(s)",
    "literal_error": lambda c: f"one of {c['expected']}",
}
_ALLOWED_BY_TYPE = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "string_unicode": "valid Unicode text (no lone surrogates)", "missing": "a value (this field is required)",
    "model_type": "a JSON object", "dict_type": "a JSON object",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        # Lone surrogates (valid JSON escapes, not text) cannot be encoded back: show them escaped.
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(value) > 200:  # do not echo a huge prompt back
            return value[:200] + f"... ({len(value)} characters)"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)[:200]


def safe_value(value: Any) -> Any:
    """A value fit to echo in a JSON error body."""
    return _json_safe(value)


def validation_errors(error: ValidationError, model: type[ImageRequest] = ImageGenerationRequest) -> list[dict]:
    """One {"field", "value", "allowed", "message"} per problem pydantic found in a body for `model`."""
    fields = ", ".join([*model.model_fields, *model.upload_fields])
    problems = []
    for item in error.errors(include_url=False):
        name = ".".join(str(part) for part in item["loc"]) or "(body)"
        context = item.get("ctx") or {}
        make_allowed = _ALLOWED_FROM_CONTEXT.get(item["type"])
        if make_allowed is not None:
            allowed = make_allowed(context)
        elif item["type"] == "extra_forbidden":
            allowed = f"no such field: the fields are {fields}"
        elif item["type"] == "value_error":
            allowed = str(context.get("error", item["msg"]))
        else:
            allowed = _ALLOWED_BY_TYPE.get(item["type"], item["msg"])
        problems.append({"field": name, "value": _json_safe(item.get("input")), "allowed": allowed,
                         "message": item["msg"]})
    return problems


def parse_request(model: type[ImageRequest], body: Any) -> ImageRequest:
    """Validate a decoded JSON body (or an edit's form fields); raises pydantic's ValidationError."""
    return model.model_validate(body)
