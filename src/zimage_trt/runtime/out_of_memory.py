"""Recognising an out-of-memory error and saying what to do about it; leaving nothing of it behind."""

from __future__ import annotations

import traceback

import torch

_OOM_TEXTS = ("CUDA out of memory", "CUDA error: out of memory", "_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def _chain(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_out_of_memory(error: BaseException | None) -> bool:
    """torch's OOM error, anywhere in the chain (a failed graph capture may raise another error on top)."""
    return any(isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXTS))
               for e in _chain(error))


def clear_frames(error: BaseException) -> None:
    """The error's traceback keeps every frame it passed through, and their tensors, alive for as long as
    the caller (or a Future) holds the error: clear them, along the whole chain."""
    for item in _chain(error):
        traceback.clear_frames(item.__traceback__)


def oom_message(error: BaseException, device: torch.device, *, images: int, height: int, width: int, cfg: bool) -> str:
    lines = str(error).strip().splitlines()
    detail = (lines[0] if lines else type(error).__name__)[:300]
    size = f"{width}x{height}"  # WIDTHxHEIGHT, as users write sizes
    advice = []
    if images > 1:
        advice.append(f"fewer images per call (this one made {images}: lower num_images_per_prompt "
                      f"or pass fewer prompts)")
    advice.append(f"a smaller size than {size}")
    if cfg:
        advice.append("guidance_scale=0 (CFG doubles the denoiser batch)")
    advice.append("or free the memory other processes hold on the device")
    return (
        f"out of memory (OOM) on {device} while generating {images} image(s) at {size}: {detail}. "
        f"Retry with {'; '.join(advice)}. The request's buffers were released; the pipeline remains usable."
    )
