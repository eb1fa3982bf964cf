"""From final latents to the caller's images: finiteness checks, the VAE decoder, PIL conversion.

The VAE stage on a GPU (the decoder itself is the compiled one, engines/torch_compiled.py): one host
sync per call, where the pixels reach the host. The decoded image's finiteness is computed on the GPU
and read after that copy (not a sync of its own in the middle, which left the GPU idle while the CPU
queued the conversion); the 8-bit conversion and the NCHW -> NHWC transposition are GPU kernels, the
last of which writes the transposed uint8 image in one pass; the copy to the host lands in pinned
memory (a DMA at full speed instead of a staged copy through pageable memory).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import NonFiniteOutputError

PINNED_SHAPES = 4  # pinned host buffers kept per pipeline, one per image batch shape (3 MiB at 1024²)


def check_finite_latents(latents: torch.Tensor, dtype: torch.dtype) -> None:
    if torch.isfinite(latents).all():
        return
    bad = [i for i in range(latents.shape[0]) if not torch.isfinite(latents[i]).all()]
    hint = " (fp16 overflow: use bf16 or an engine built with fp16 downscaling)" if dtype == torch.float16 else ""
    raise NonFiniteOutputError(f"denoising produced NaN/inf latents for image(s) {bad}{hint}; no image was decoded")


def _decoder_overflowed(dtype) -> NonFiniteOutputError:
    return NonFiniteOutputError(
        f"the VAE decoder produced NaN/inf pixels ({dtype}); the latents were finite, so the "
        f"decoder overflowed: run the VAE in bfloat16 or float32"
    )


class PinnedImages:
    """Pinned host buffers for 8-bit images coming off the GPU, one per shape (a few kept), owned by
    one pipeline (whose lock serialises its calls: a buffer is reused only after its images were made)."""

    def __init__(self, keep: int = PINNED_SHAPES):
        self.keep = keep
        self._buffers: dict[tuple, torch.Tensor] = {}

    def fetch(self, pixels: torch.Tensor, *extra: torch.Tensor) -> tuple[np.ndarray, list]:
        """Copy `pixels` (uint8, CUDA) and each small `extra` tensor to the host with one sync; returns the
        pixels as a numpy view of the pinned buffer (valid until the next fetch of that shape) and the
        extras' values (`.tolist()`)."""
        key = (tuple(pixels.shape), pixels.device)
        host = self._buffers.pop(key, None)
        if host is None:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        self._buffers[key] = host  # (most recently used last)
        while len(self._buffers) > self.keep:
            self._buffers.pop(next(iter(self._buffers)))
        host.copy_(pixels, non_blocking=True)
        values = [t.cpu().tolist() for t in extra]  # (a blocking copy on the same stream: the pixels are in)
        if not extra:
            torch.cuda.current_stream(pixels.device).synchronize()
        return host.numpy(), values


@torch.no_grad()
def decode_latents(vae, image_processor, latents: torch.Tensor, output_type: str = "pil",
                   staging: PinnedImages | None = None):
    """diffusers' `AutoencoderKL.decode` and `VaeImageProcessor.postprocess`, PIL conversion on the GPU."""
    if output_type == "latent":
        return latents
    latents = latents.to(vae.device, vae.dtype)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    if output_type == "pil" and image.is_cuda and image.shape[1] == 3:
        finite = torch.isfinite(image).all()  # read with the pixels: no sync of its own
        return to_pil_on_gpu(image_processor.postprocess(image, output_type="pt"), staging, finite)
    if not torch.isfinite(image).all():
        raise _decoder_overflowed(vae.dtype)
    return image_processor.postprocess(image, output_type=output_type)


def to_8bit_nhwc(image: torch.Tensor) -> torch.Tensor:
    """diffusers' numpy_to_pil arithmetic (x * 255 in float32, round half to even, uint8) on [B, 3, H, W]
    in [0, 1], written as [B, H, W, 3] uint8 by the last kernel (conversion and transposition in one)."""
    scaled = image.float().mul(255).round_()  # (mul, not mul_: .float() of fp32 is the caller's tensor)
    out = torch.empty((image.shape[0], image.shape[2], image.shape[3], image.shape[1]), dtype=torch.uint8,
                      device=image.device)
    out.copy_(scaled.permute(0, 2, 3, 1))  # float -> uint8 as .to(torch.uint8) converts (truncation of integers)
    return out


def to_pil_on_gpu(image: torch.Tensor, staging: PinnedImages | None = None, finite: torch.Tensor | None = None) -> list:
    """diffusers' numpy_to_pil (x * 255, round half to even, uint8) done on the GPU in float32: bitwise
    the same images, and a quarter of the bytes cross to the host. With `finite` (a GPU bool), a
    NonFiniteOutputError is raised when it is False, read with the pixels."""
    pixels = to_8bit_nhwc(image)
    if pixels.is_cuda:
        staging = staging if staging is not None else PinnedImages(keep=1)
        array, values = staging.fetch(pixels, *([finite] if finite is not None else []))
        if values and not values[0]:
            raise _decoder_overflowed(image.dtype)
    else:
        array = pixels.numpy()
    # (mode RGB copies: PIL stores RGB as 4 bytes a pixel, so the images never alias the pinned buffer)
    return [Image.fromarray(item) for item in array]
