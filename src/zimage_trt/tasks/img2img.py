"""`ZImageTRTImg2ImgPipeline`: diffusers' `ZImageImg2ImgPipeline` over the engines.

    pipe = ZImageTRTImg2ImgPipeline.from_pretrained("path/to/Z-Image-Turbo", engine_dir="engines/")
    image = pipe("a watercolour fox", image=photo, strength=0.6).images[0]

As diffusers: the image is encoded (a sample of the VAE's latent distribution, drawn with the caller's
generator), `strength` keeps the last `int(steps * strength)`-ish steps of the schedule (its
`get_timesteps`), and the image latents are noised to the first of them by the scheduler's own
`scale_noise`; then the same loop as text to image runs, and its time follows the steps it runs. One
difference: an image whose size is not height x width is resized to it by diffusers' image processor
(diffusers 0.42 fails inside the model on it). A tensor with the transformer's latent channels is the
image's latents, taken as they are (as diffusers' `prepare_latents`), of the latent size of height x
width (which default to its size, 8 pixels a latent row); inpainting takes them too (its mask then of
height x width pixels), where diffusers 0.42's inpaint fails on them.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..model.shapes import PATCH_SIZE, PIXELS_PER_TOKEN, VAE_SCALE
from ..pipeline import DenoisePlan, ZImageTRTPipeline
from ..request import Request
from ..runtime import image_input
from .common import (CALL_TAIL, check_sizes, check_steps_left, check_strength, resolved_size, strength_schedule,
                     task_call)

DEFAULT_STRENGTH = 0.6  # diffusers' ZImageImg2ImgPipeline


def given_latents(pipe, image) -> torch.Tensor | None:
    """`image` as latents [B, C, h, w] when it is a tensor (or a list of them) with the transformer's latent
    channels, which diffusers takes as they are; None for an image. Told apart before diffusers' image
    processor sees it (built for 4-channel latents, it would resize and normalise 16-channel ones)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    first = items[0]
    if not isinstance(first, torch.Tensor) or first.ndim not in (3, 4) or first.shape[-3] != pipe.latent_channels:
        return None
    try:
        return torch.cat([t if t.ndim == 4 else t[None] for t in items]).to(torch.float32)
    except RuntimeError:
        raise ValueError(f"image is a list of latent tensors of different shapes {[tuple(t.shape) for t in items]}; "
                         f"pass latents of one shape") from None


class StartImage:
    """The starting image of image to image and inpainting: checked, preprocessed at the output size, or
    latents (`given`) taken as they are (diffusers), of the latent size of height x width."""

    def __init__(self, pipe, image, height, width):
        check_sizes(height, width)
        image_input.check_image("image", image)
        self.image = image
        self.given = given_latents(pipe, image)
        if self.given is not None:
            self.pixels = None
            self.height, self.width = self._latent_size(pipe, height, width)
            self.size = (self.height, self.width)  # the mask's size (inpainting)
            return
        self.size = image_input.pixel_size(image)
        pixels = image_input.preprocess(pipe.image_processor, "image", image)
        self.height, self.width = resolved_size(pixels, height, width)
        if tuple(pixels.shape[-2:]) != (self.height, self.width):
            pixels = image_input.preprocess(pipe.image_processor, "image", image, self.height, self.width)
        self.pixels = pixels

    def _latent_size(self, pipe, height, width) -> tuple[int, int]:
        """height/width: the caller's, else the latents' (8 pixels a latent row / column); the latents
        must be the latent size of height x width (diffusers' 2 * (side // 16))."""
        rows, cols = (int(s) for s in self.given.shape[-2:])
        height = height if height is not None else rows * VAE_SCALE
        width = width if width is not None else cols * VAE_SCALE
        wanted = (height // PIXELS_PER_TOKEN * PATCH_SIZE, width // PIXELS_PER_TOKEN * PATCH_SIZE)
        if (rows, cols) != wanted:
            raise ValueError(f"image is latents of shape {tuple(self.given.shape)} (taken as they are, as diffusers "
                             f"does), but height x width {height}x{width} has latents of {wanted[0]}x{wanted[1]}; "
                             f"pass latents of that size (an even number of rows and columns, {VAE_SCALE} pixels "
                             f"each) or the height/width they are")
        return height, width

    @property
    def count(self) -> int:
        return (self.given if self.given is not None else self.pixels).shape[0]

    def check_batch(self, request: Request) -> None:
        image_input.check_count("image", self.count, request.images, request.per_prompt, "tile")

    def latents(self, pipe, request: Request, generator) -> torch.Tensor:
        """The image's latents, one per image to make ([a, b, a, b] for two images, as diffusers)."""
        if self.given is not None:  # already latents (diffusers takes those as they are)
            encoded = self.given.to(pipe.device)
        else:
            encoded = image_input.encode(pipe.vae, self.pixels, generator, sample=True).to(pipe.device)
        return image_input.batch_of("image", encoded, request.images, request.per_prompt, "tile")


class ImageToImage:
    name = "image-to-image"

    def __init__(self, pipe, image, strength, height, width):
        self.strength = check_strength(strength)
        self.start = StartImage(pipe, image, height, width)

    def check(self, pipe, request: Request) -> None:
        check_steps_left(request, self.strength)
        self.start.check_batch(request)

    def plan(self, pipe, request: Request, generator, latents) -> DenoisePlan:
        timesteps, sigmas = strength_schedule(pipe, request, self.strength)
        if latents is not None:  # diffusers: the caller's latents as they are
            return DenoisePlan(latents.to(pipe.device, torch.float32), timesteps, sigmas)
        image_latents = self.start.latents(pipe, request, generator)
        noise = randn_tensor(pipe.latent_shape(request.images, request.resolution), generator=generator,
                             device=pipe.device, dtype=torch.float32)
        initial = pipe.scheduler.scale_noise(image_latents, timesteps[:1].repeat(request.images), noise)
        return DenoisePlan(initial, timesteps, sigmas)


class ZImageTRTImg2ImgPipeline(ZImageTRTPipeline):
    """Image + text -> image. Everything ZImageTRTPipeline takes, plus `image` and `strength`."""

    @task_call("prompt", "image", "strength", "height", "width", "num_inference_steps", "sigmas", "guidance_scale",
               *CALL_TAIL)
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength: float = DEFAULT_STRENGTH, height: int | None = None,
                 width: int | None = None, **kwargs):
        """diffusers' `ZImageImg2ImgPipeline.__call__` (Turbo's 8 steps and guidance 0 by default, as ours):
        `image` (PIL, numpy, tensor, or a list), `strength` in [0, 1] (1 ignores the image), height/width
        default to the image's (rounded down to multiples of 16)."""
        task = ImageToImage(self, image, strength, height, width)
        return self._call(task, self._call_arguments(prompt=prompt, height=task.start.height,
                                                     width=task.start.width, **kwargs))
