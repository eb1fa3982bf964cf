"""`ZImageTRTInpaintPipeline`: diffusers' `ZImageInpaintPipeline` over the engines.

    pipe = ZImageTRTInpaintPipeline.from_pretrained("path/to/Z-Image-Turbo", engine_dir="engines/")
    image = pipe("a red door", image=photo, mask_image=mask).images[0]   # white = repaint

As diffusers: the mask goes through its mask processor (grayscale, binarised at 0.5, so a soft edge
becomes a hard one, as there) and nearest-neighbour to the latent size; the image is encoded and noised
as for image to image (`strength`, default 1.0: start from pure noise); after every step the loop blends
(1 - mask) * the image latents noised to the next step's sigma (the clean ones after the last step) +
mask * latents, inside the step's CUDA graph. `masked_image_latents` is accepted and checked as diffusers'
signature has it; diffusers' Z-Image inpaint computes but never uses it, and neither does this class.
A mask of another size than the image is refused (diffusers would resize it silently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..pipeline import DenoisePlan, ZImageTRTPipeline
from ..request import Request
from ..runtime import image_input
from ..runtime.denoise_loop import InpaintBlend
from .common import CALL_TAIL, check_steps_left, check_strength, strength_schedule, task_call
from .img2img import StartImage

DEFAULT_STRENGTH = 1.0  # diffusers' ZImageInpaintPipeline


def mask_processor(pipe) -> VaeImageProcessor:
    """diffusers' inpaint mask processor: grayscale, no [-1, 1] normalisation, binarised."""
    return VaeImageProcessor(vae_scale_factor=pipe.image_processor.config.vae_scale_factor, do_normalize=False,
                             do_binarize=True, do_convert_grayscale=True)


def check_mask(mask_image, image_size: tuple[int, int], height: int, width: int, processor) -> torch.Tensor:
    """The mask [m, 1, height, width] in {0, 1}, refused when it is not an image or not of `image_size`
    (the image's (height, width) in pixels)."""
    image_input.check_image("mask_image", mask_image)
    mask_size = image_input.pixel_size(mask_image)
    if mask_size != image_size:
        raise ValueError(f"mask_image is {mask_size[1]}x{mask_size[0]} (WIDTHxHEIGHT) but image is "
                         f"{image_size[1]}x{image_size[0]}; pass a mask of the image's size (white = repaint)")
    return image_input.preprocess(processor, "mask_image", mask_image, height, width)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """diffusers: the pixel mask, nearest-neighbour down to the latent size."""
    return F.interpolate(mask, size=latent_hw, mode="nearest")


def check_masked_image_latents(value, request: Request, latent_shape) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"masked_image_latents must be a floating-point torch.Tensor, got {type(value).__name__}")
    if value.ndim != 4 or tuple(value.shape[1:]) != tuple(latent_shape[1:]):
        raise ValueError(f"masked_image_latents has shape {tuple(value.shape)}, expected [images, "
                         f"{', '.join(str(s) for s in latent_shape[1:])}] (the VAE latents of the masked image)")
    image_input.check_count("masked_image_latents", value.shape[0], request.images, request.per_prompt, "tile")
    if not torch.isfinite(value).all():
        raise ValueError("masked_image_latents contains NaN or inf values")


class Inpaint:
    name = "inpaint"

    def __init__(self, pipe, image, mask_image, masked_image_latents, strength, height, width):
        self.strength = check_strength(strength)
        self.start = StartImage(pipe, image, height, width)
        self.mask = check_mask(mask_image, self.start.size, self.start.height, self.start.width, mask_processor(pipe))
        self.masked_image_latents = masked_image_latents

    def check(self, pipe, request: Request) -> None:
        check_steps_left(request, self.strength)
        self.start.check_batch(request)
        image_input.check_count("mask_image", self.mask.shape[0], request.images, request.per_prompt, "tile")
        check_masked_image_latents(self.masked_image_latents, request, pipe.latent_shape(1, request.resolution))

    def plan(self, pipe, request: Request, generator, latents) -> DenoisePlan:
        timesteps, sigmas = strength_schedule(pipe, request, self.strength)
        shape = pipe.latent_shape(request.images, request.resolution)
        # diffusers' order of draws: with the caller's latents the noise first, else the image's sample first.
        if latents is not None:
            noise = randn_tensor(shape, generator=generator, device=pipe.device, dtype=torch.float32)
            image_latents = self.start.latents(pipe, request, generator)
            initial = latents.to(pipe.device, torch.float32)
        else:
            image_latents = self.start.latents(pipe, request, generator)
            noise = randn_tensor(shape, generator=generator, device=pipe.device, dtype=torch.float32)
            initial = pipe.scheduler.scale_noise(image_latents, timesteps[:1].repeat(request.images), noise)
        mask = latent_mask(self.mask, shape[-2:]).to(pipe.device)
        mask = image_input.batch_of("mask_image", mask, request.images, request.per_prompt, "tile")
        return DenoisePlan(initial, timesteps, sigmas, blend=InpaintBlend(mask, image_latents, noise))


class ZImageTRTInpaintPipeline(ZImageTRTPipeline):
    """Image + mask + text -> image. Everything ZImageTRTPipeline takes, plus `image`, `mask_image`,
    `masked_image_latents` and `strength`."""

    @task_call("prompt", "image", "mask_image", "masked_image_latents", "strength", "height", "width",
               "num_inference_steps", "sigmas", "guidance_scale", *CALL_TAIL)
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, masked_image_latents=None,
                 strength: float = DEFAULT_STRENGTH, height: int | None = None, width: int | None = None, **kwargs):
        """diffusers' `ZImageInpaintPipeline.__call__` (Turbo's 8 steps and guidance 0 by default, as ours):
        `mask_image` white where to repaint, of the image's size; height/width default to the image's."""
        if self._parallel is not None:
            raise ValueError("inpainting blends inside each step on one GPU; run it with sequence_parallel=1")
        task = Inpaint(self, image, mask_image, masked_image_latents, strength, height, width)
        return self._call(task, self._call_arguments(prompt=prompt, height=task.start.height,
                                                     width=task.start.width, **kwargs))
