"""Images a client sends (an edit's `image`, `mask` and `control_image` files; a generation's base64
`control_image`): what is taken, and how a mask says where to repaint.

- PNG, JPEG and WebP only, known by their first bytes (never by a file name or a declared type) and
  decoded by Pillow with only that format's decoder; anything else is a 400 naming what is allowed.
- At most `max_pixels` pixels, read from the header before anything is decoded: a small file can claim a
  huge canvas (a decompression bomb).
- An EXIF orientation is applied (the image as a browser or a photo viewer shows it), before any size is
  compared.

The mask, two conventions (`repaint_mask`):
- OpenAI's: a mask with transparency (an alpha channel in which some pixel is not fully opaque) marks the
  TRANSPARENT pixels as the ones to edit. It becomes diffusers' mask as 255 - alpha: fully transparent ->
  white (repaint), opaque -> black (keep); diffusers binarises at one half, so alpha <= 127 is repainted.
- diffusers': a mask without transparency (greyscale, RGB, or an alpha channel opaque everywhere) is
  read as its greyscale, white = repaint, binarised the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import PIL.Image
from PIL import ImageOps

from .outcome import ServiceError

ALLOWED = "a PNG, JPEG or WebP image"
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # our name -> Pillow's
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def sniff(data: bytes) -> str | None:
    """"png", "jpeg" or "webp" from the file's signature, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def open_image(field: str, data: bytes, max_pixels: int) -> PIL.Image.Image:
    """The decoded image of an upload (orientation applied), or a ServiceError 400 about `field`."""
    kind = sniff(data)
    if kind is None:
        shown = data[:8].hex(" ") if data else "nothing: the file is empty"
        raise ServiceError(400, "invalid_image_format", f"{field}: not {ALLOWED} (its first bytes are {shown}); "
                           f"upload a PNG, JPEG or WebP file", param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=[_FORMATS[kind]])
            width, height = image.size
            if width * height > max_pixels:
                raise _TooLarge(width, height)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (_TooLarge, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        # (Pillow's own bound stops a canvas past its MAX_IMAGE_PIXELS at open, before ours is read.)
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{error.width}x{error.height} (WIDTHxHEIGHT)" if isinstance(error, _TooLarge) else \
            f"{claimed.group(1) if claimed else 'too many'} pixels"
        raise ServiceError(400, "image_too_large", f"{field} is {size}: at most {max_pixels} pixels are taken; "
                           f"scale it down (it is resized to the output size anyway)", param=field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's ways of saying "broken file"
        raise ServiceError(400, "invalid_image", f"{field}: a {kind.upper()} file that could not be decoded "
                           f"({type(error).__name__}: {str(error)[:120]}); upload {ALLOWED} that opens in an "
                           f"image viewer", param=field) from None
    return image


class _TooLarge(Exception):
    def __init__(self, width: int, height: int):
        super().__init__(f"{width}x{height}")
        self.width, self.height = width, height


def decode_base64(field: str, text: str) -> bytes:
    """The bytes of a base64 upload (plain, or a `data:image/...;base64,` URL), or a ServiceError 422."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(422, "invalid_value", f"{field} is not base64: send {ALLOWED} file in base64 (or as "
                           f"a data: URL)", param=field) from None


def has_transparency(image: PIL.Image.Image) -> bool:
    """Whether some pixel is not fully opaque (an alpha channel, or a palette's / PNG's transparent colour)."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return False
    low, _ = image.convert("RGBA").getchannel("A").getextrema()
    return low < 255


def repaint_mask(mask: PIL.Image.Image) -> tuple[PIL.Image.Image, str]:
    """(diffusers' mask: an "L" image, white = repaint; the rule used: "alpha" or "greyscale"): see the
    module's docstring."""
    if has_transparency(mask):
        return ImageOps.invert(mask.convert("RGBA").getchannel("A")), "alpha"
    return mask.convert("L"), "greyscale"


def as_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The picture the pipeline takes: RGB (an alpha channel is dropped: the mask says what to repaint)."""
    return image if image.mode == "RGB" else image.convert("RGB")
