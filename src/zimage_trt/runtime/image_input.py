"""From the caller's images to latents: type and size checks, diffusers' image processors, the VAE encoder.

The counterpart of image_output.py for the image tasks (image to image, inpainting, ControlNet). Images
are what diffusers' `PipelineImageInput` takes: a PIL image, a numpy array, a torch tensor, or a list of
one of those; anything else is refused naming the argument.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)


def check_image(name: str, image) -> list:
    """`image` as a non-empty list of one kind of image, or a TypeError/ValueError naming `name`."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if image is None:
        raise ValueError(f"{name} is required: a PIL image, a numpy array or a torch tensor (or a list of them)")
    if not items:
        raise ValueError(f"{name} is an empty list; pass at least one image")
    for i, item in enumerate(items):
        if not isinstance(item, IMAGE_TYPES):
            where = f"{name}[{i}]" if isinstance(image, (list, tuple)) else name
            raise TypeError(f"{where} must be a PIL image, a numpy array or a torch tensor, got {type(item).__name__}"
                            + (" (open a file with PIL.Image.open first)" if isinstance(item, (str, bytes)) else ""))
        if not isinstance(item, type(items[0])):
            raise TypeError(f"{name} mixes {type(items[0]).__name__} and {type(item).__name__}; pass one kind")
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.dtype != bool and not _finite(item):
            raise ValueError(f"{name} contains NaN or inf values")
    return items


def _finite(array) -> bool:
    if isinstance(array, np.ndarray):
        return bool(np.isfinite(array).all()) if np.issubdtype(array.dtype, np.floating) else True
    return bool(torch.isfinite(array).all()) if array.is_floating_point() else True


def pixel_size(image) -> tuple[int, int]:
    """(height, width) of the first image: PIL's size, a tensor's last two axes ([C, H, W] / [B, C, H, W]),
    an array's [H, W], [H, W, C] or [B, H, W, C]."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, torch.Tensor):
        return tuple(int(s) for s in first.shape[-2:])
    shape = first.shape
    if first.ndim == 2:
        return int(shape[0]), int(shape[1])
    if first.ndim == 3:
        return (int(shape[0]), int(shape[1])) if shape[-1] in (1, 3, 4) else (int(shape[1]), int(shape[2]))
    return int(shape[1]), int(shape[2])


def preprocess(processor, name: str, image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """diffusers' `VaeImageProcessor.preprocess` ([B, C, H, W] float32), its refusals naming `name`."""
    try:
        return processor.preprocess(image, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name} could not be read as an image: {error}") from None


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """diffusers' `retrieve_latents(vae.encode(...))`, normalised: (latents - shift) * scale, float32.

    `sample=True` draws from the latent distribution with `generator` (image to image, inpainting; a
    list of generators: image i with generator i, as diffusers), False takes its mode (ControlNet)."""
    pixels = pixels.to(vae.device, vae.dtype)
    if vae.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)  # the compiled encoder's layout
    if sample and isinstance(generator, (list, tuple)):
        latents = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample(generator[i])
                             for i in range(pixels.shape[0])])
    else:
        dist = vae.encode(pixels).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.float32)


def check_count(name: str, count: int, images: int, per_prompt: int, rule: str) -> None:
    """Whether `count` inputs can serve `images` images by `rule` (see `batch_of`); a ValueError if not."""
    prompts = images // per_prompt
    if count == images:
        return
    if rule == "tile" and (count > images or images % count):
        raise ValueError(f"{name} has {count} images for {images} images to make; pass 1, or a number that "
                         f"divides {images} (they are repeated in turn, as diffusers does)")
    if rule == "interleave" and count not in (1, prompts):
        raise ValueError(f"{name} has {count} images for {prompts} prompt(s); pass 1, or one per prompt")


def batch_of(name: str, tensor: torch.Tensor, images: int, per_prompt: int, rule: str) -> torch.Tensor:
    """`tensor`'s items repeated to `images` as the diffusers class does: rule "tile" (image to image,
    inpainting: [a, b, a, b]), "interleave" (ControlNet: one item for all, or one per prompt [a, a, b, b])."""
    count = tensor.shape[0]
    check_count(name, count, images, per_prompt, rule)
    if count == images:
        return tensor
    if rule == "tile":
        return torch.cat([tensor] * (images // count))
    return tensor.repeat_interleave(images if count == 1 else per_prompt, dim=0)
