"""Resolution <-> latent shape <-> token counts, and the validation of user sizes.

Z-Image's VAE downsamples by 8 and the transformer patchifies 2x2 latent pixels into one token, so a
resolution must be a multiple of 16 pixels. Every sequence the transformer builds (image tokens,
caption tokens) is padded up to a multiple of ``SEQ_MULTI_OF`` tokens. How large an image may be is the
model's own limit: its RoPE tables (``axes_lens``) hold so many image rows and columns (see
``check_fits_rope``); Z-Image-Turbo's hold 512 tokens a side, 8192 pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VAE_SCALE = 8  # pixels per latent pixel
PATCH_SIZE = 2  # latent pixels per token side
PIXELS_PER_TOKEN = VAE_SCALE * PATCH_SIZE  # 16
SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF
LATENT_CHANNELS = 16


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_caption_length(length: int) -> int:
    """Caption tokens the transformer attends to for a caption of ``length`` real tokens."""
    return round_up(max(int(length), 1), SEQ_MULTI_OF)


@dataclass(frozen=True, order=True)
class Resolution:
    """An image size in pixels. Python takes ``height``/``width`` (diffusers' order, and a ``(height, width)``
    pair); text is ``WIDTHxHEIGHT``, as OpenAI's ``size``, A1111 and ComfyUI users write it, so ``key`` and
    ``str()`` are ``"1344x768"`` for a landscape image 1344 wide and 768 tall."""

    height: int
    width: int

    def __post_init__(self):
        check_side("height", self.height)
        check_side("width", self.width)

    @classmethod
    def parse(cls, text: "str | Resolution | tuple[int, int]") -> "Resolution":
        """'1344x768' (WIDTHxHEIGHT: 1344 wide, 768 tall), '1024' (square), a (height, width) pair or a
        Resolution."""
        if isinstance(text, Resolution):
            return text
        if isinstance(text, (tuple, list)) and len(text) == 2:
            return cls(int(text[0]), int(text[1]))
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×*,]\s*(\d+))?\s*", str(text))
        if not match:
            raise ValueError(
                f"cannot read size {text!r}: write WIDTHxHEIGHT in pixels, e.g. '1024x1024', or '1344x768' "
                f"for an image 1344 wide and 768 tall"
            )
        width = int(match.group(1))
        height = int(match.group(2) or width)
        return cls(height, width)

    @classmethod
    def of_latents(cls, latents) -> "Resolution":
        """The image size a latent tensor (..., height/8, width/8), or such a tensor's shape, decodes to."""
        shape = getattr(latents, "shape", latents)
        return cls(int(shape[-2]) * VAE_SCALE, int(shape[-1]) * VAE_SCALE)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // VAE_SCALE, self.width // VAE_SCALE

    @property
    def image_tokens(self) -> int:
        """Real image tokens (before padding to a multiple of 32)."""
        return (self.height // PIXELS_PER_TOKEN) * (self.width // PIXELS_PER_TOKEN)

    @property
    def padded_image_tokens(self) -> int:
        return round_up(self.image_tokens, SEQ_MULTI_OF)

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        h, w = self.latent_hw
        return (batch, LATENT_CHANNELS, h, w)

    @property
    def key(self) -> str:
        """'WIDTHxHEIGHT', the one way a size is written for users, engine manifests' displays and lookups."""
        return f"{self.width}x{self.height}"

    def __str__(self) -> str:
        return self.key


def check_side(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of pixels, got {type(value).__name__} {value!r}")
    if value % PIXELS_PER_TOKEN:
        lower = value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        raise ValueError(
            f"{name}={value} is not a multiple of {PIXELS_PER_TOKEN} pixels (VAE factor {VAE_SCALE} x patch "
            f"{PATCH_SIZE}); use {lower} or {lower + PIXELS_PER_TOKEN}"
        )
    if value < PIXELS_PER_TOKEN:
        raise ValueError(f"{name}={value} must be a positive multiple of {PIXELS_PER_TOKEN} pixels, e.g. {PIXELS_PER_TOKEN}")


def check_fits_rope(resolution: Resolution, axes_lens, pixels_per_token: int = PIXELS_PER_TOKEN) -> Resolution:
    """The image fits the transformer's RoPE tables: token rows index table 1, columns table 2
    (diffusers' `ZImageTransformer2DModel` positions; past the table there is no position to give).
    `pixels_per_token`: the VAE's factor times the patch size (16 for Z-Image's VAE)."""
    for name, side, axis in (("height", resolution.height, 1), ("width", resolution.width, 2)):
        limit, tokens = int(axes_lens[axis]), side // pixels_per_token
        if tokens > limit:
            raise ValueError(
                f"{name}={side} is {tokens} image tokens, but this transformer's RoPE table "
                f"(axes_lens[{axis}]={limit}) holds {limit}: at most {limit * pixels_per_token} pixels"
            )
    return resolution


def check_caption_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < SEQ_MULTI_OF:
        raise ValueError(f"caption capacity must be an int >= {SEQ_MULTI_OF}, got {capacity!r}")
    if capacity % SEQ_MULTI_OF:
        raise ValueError(
            f"caption capacity {capacity} is not a multiple of {SEQ_MULTI_OF} (the transformer pads captions to "
            f"multiples of {SEQ_MULTI_OF}); use {round_up(capacity, SEQ_MULTI_OF)}"
        )
    return capacity
