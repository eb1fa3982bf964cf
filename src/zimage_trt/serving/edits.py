"""POST /v1/images/edits as OpenAI's: a multipart/form-data body with the file `image` (one; OpenAI's
`image[]` array is taken with one file), an optional file `mask`, and the other fields as form fields
(`ImageEditRequest`, plus `control_image` as a file or in base64 on a server started with --controlnet).

    without a mask: image to image (`strength`, default 0.6)
    with a mask:    inpainting (`strength`, default 1.0), or ControlNet inpainting with `control_image`

The mask rule (transparent = edit, as OpenAI's; or white = edit, as diffusers') is uploads.py's. The
image and the mask must be the same size. `size`: a served size (the image is resized to it by
diffusers' image processor, as the pipeline would), or `auto` (the default, as OpenAI's): the image's
own size snapped to what is served (`auto_size`).

A browser sends a multipart form to another site without asking first (no CORS preflight, unlike a JSON
body): a form whose `Origin` is not this server's own is refused (403), so that a web page cannot spend
a keyless server's GPU through the user's browser.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..model.shapes import PIXELS_PER_TOKEN, Resolution
from .family import TaskImages, no_controlnet
from .outcome import ServiceError, parsed
from .schema import ImageEditRequest, ServingLimits
from .uploads import ALLOWED, as_rgb, decode_base64, open_image, repaint_mask

MAX_FORM_FIELDS = 64  # OpenAI's fields and ours are about 25
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask", "control_image": "control_image"}


def same_origin(request: Request) -> bool:
    """No `Origin` (a script, the openai client), or this server's own: its host[:port] is the Host header
    ("null", a sandboxed frame's or a file: page's, is not)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urllib.parse.urlsplit(origin.strip()).netloc.lower() == request.headers.get("host", "").strip().lower()


async def read_form(request: Request, max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(form fields, uploaded files) of an edit, or a ServiceError (400/403/415) saying what is wrong."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise ServiceError(415, "unsupported_media_type", "send an edit as multipart/form-data (as the openai "
                           "client's images.edit does): the file 'image' (and 'mask'), the other fields as form fields")
    if not same_origin(request):
        raise ServiceError(403, "cross_origin", "a form posted from another site's page is refused; call the API "
                           "from a script or a client, or from this server's own page")
    try:
        form = await request.form(max_files=len(_FILE_FIELDS), max_fields=MAX_FORM_FIELDS, max_part_size=max_bytes)
    except StarletteHTTPException as error:
        raise ServiceError(400, "invalid_multipart", f"the multipart body could not be read: {error.detail}") from None
    try:
        fields: dict[str, str] = {}
        uploads: dict[str, list[UploadFile]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = _FILE_FIELDS.get(key)
                if name is None:
                    hint = " (an overlay to guide the edit; send a mask instead)" if key == "markup" else ""
                    raise ServiceError(400, "invalid_value", f"a file came as {key!r}{hint}: the files taken are "
                                       f"'image', 'mask' and 'control_image'", param=key)
                uploads.setdefault(name, []).append(value)
            elif key in _FILE_FIELDS and key != "control_image":
                raise ServiceError(400, "invalid_value", f"{key} must be a file ({ALLOWED}), sent as a multipart "
                                   f"file part", param=key.removesuffix("[]"))
            elif key in fields:
                raise ServiceError(422, "invalid_value", f"{key} is given more than once; give it once", param=key)
            else:
                fields[key] = value
        for name, files in uploads.items():
            if len(files) > 1:
                several = "images: this model edits one image a request; send one file as 'image'" if name == "image" \
                    else f"{name} files; send one"
                raise ServiceError(400, "invalid_value", f"{len(files)} {several}", param=name)
        files = {name: await parts[0].read() for name, parts in uploads.items()}
    finally:
        await form.close()
    if "control_image" in fields:
        if "control_image" in files:
            raise ServiceError(422, "invalid_value", "control_image came as a file and as a field; send one",
                               param="control_image")
        files["control_image"] = fields.pop("control_image")  # base64: decoded with the files, off the event loop
    return fields, files


def open_control_image(data: bytes | str, limits: ServingLimits):
    """A control image sent as a file (bytes) or in base64 (str), opened and checked (CPU work: in a thread)."""
    raw = decode_base64("control_image", data) if isinstance(data, str) else data
    return as_rgb(open_image("control_image", raw, limits.max_image_pixels))


def auto_size(width: int, height: int, limits: ServingLimits) -> str:
    """`size: "auto"` for an image of width x height. Fixed sizes: the served size nearest its aspect
    ratio (then nearest its area). Any size (--allow-fallback): the image's own, scaled down to at most
    the area of the server's first size and rounded down to multiples of 16."""
    if not limits.any_size:
        def distance(size: str):
            r = Resolution.parse(size)
            return abs(math.log((r.width / r.height) / (width / height))), abs(math.log(r.width * r.height / (width * height)))

        return min(limits.sizes, key=distance)
    cap = Resolution.parse(limits.default_size)
    scale = min(1.0, math.sqrt(cap.width * cap.height / (width * height)))
    side = PIXELS_PER_TOKEN

    def snapped(n: int) -> int:
        return max(side, int(n * scale) // side * side)

    return Resolution(snapped(height), snapped(width)).key


def edit_images(req: ImageEditRequest, files: dict[str, bytes], limits: ServingLimits, family):
    """(the request with its size resolved, its TaskImages at that size): the uploads decoded and checked
    (run in a thread: decoding and resizing are CPU work)."""
    image = open_image("image", files["image"], limits.max_image_pixels)
    mask = open_image("mask", files["mask"], limits.max_image_pixels) if "mask" in files else None
    if mask is not None and mask.size != image.size:
        raise ServiceError(400, "invalid_value", f"mask is {mask.width}x{mask.height} but image is "
                           f"{image.width}x{image.height} (WIDTHxHEIGHT): send a mask of the image's size",
                           param="mask")
    control = open_control_image(files["control_image"], limits) if "control_image" in files else None
    if req.size == "auto":
        req = req.model_copy(update={"size": auto_size(image.width, image.height, limits)})
    if control is not None and req.strength is not None:
        raise ServiceError(422, "invalid_value", "strength is not taken with control_image: diffusers' ControlNet "
                           "inpainting starts from pure noise; leave strength out", param="strength")
    images = TaskImages(as_rgb(image), repaint_mask(mask)[0] if mask is not None else None, control, req.strength)
    resolution = req.resolution
    return req, family.fit(images, resolution.height, resolution.width)


async def read_edit(request: Request, model: type[ImageEditRequest], service) -> tuple[ImageEditRequest, dict]:
    """(the request, its uploaded files, undecoded) of an edit, or a ServiceError saying what is wrong;
    `decode_edit` decodes them (after the refusals that need no image)."""
    fields, files = await read_form(request, service.limits.upload_body_bytes)
    req = parsed(model, fields)
    if "image" not in files:
        raise ServiceError(422, "invalid_value", f"image is required: the image to edit, {ALLOWED}, as the "
                           f"multipart file 'image'", param="image")
    if "control_image" in files and not service.takes_control_images:
        raise no_controlnet()
    return req, files


async def decode_edit(req: ImageEditRequest, files: dict, service) -> tuple[ImageEditRequest, TaskImages]:
    """`edit_images` in a thread: (the request with its size resolved, its TaskImages)."""
    return await asyncio.to_thread(edit_images, req, files, service.limits, service.task_family())
