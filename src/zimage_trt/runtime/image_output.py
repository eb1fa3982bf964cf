"""From final latents to the caller's images: finiteness checks, the VAE decoder, PIL conversion."""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import NonFiniteOutputError


def check_finite_latents(latents: torch.Tensor, dtype: torch.dtype) -> None:
    if torch.isfinite(latents).all():
        return
    bad = [i for i in range(latents.shape[0]) if not torch.isfinite(latents[i]).all()]
    hint = " (fp16 overflow: use bf16 or an engine built with fp16 downscaling)" if dtype == torch.float16 else ""
    raise NonFiniteOutputError(f"denoising produced NaN/inf latents for image(s) {bad}{hint}; no image was decoded")


@torch.no_grad()
def decode_latents(vae, image_processor, latents: torch.Tensor, output_type: str = "pil"):
    """diffusers' `AutoencoderKL.decode` and `VaeImageProcessor.postprocess`, PIL conversion on the GPU."""
    if output_type == "latent":
        return latents
    latents = latents.to(vae.device, vae.dtype)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    if not torch.isfinite(image).all():
        raise NonFiniteOutputError(
            f"the VAE decoder produced NaN/inf pixels ({vae.dtype}); the latents were finite, so the "
            f"decoder overflowed: run the VAE in bfloat16 or float32"
        )
    if output_type == "pil" and image.is_cuda and image.shape[1] == 3:
        return to_pil_on_gpu(image_processor.postprocess(image, output_type="pt"))
    return image_processor.postprocess(image, output_type=output_type)


def to_pil_on_gpu(image: torch.Tensor) -> list:
    """diffusers' numpy_to_pil (x * 255, round half to even, uint8) done on the GPU in float32: bitwise
    the same images, and a quarter of the bytes cross to the host."""
    pixels = image.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in pixels]
