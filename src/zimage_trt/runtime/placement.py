"""Where each part of the pipeline lives: devices, dtypes, and FP8 conversion on the way to the GPU.

With `precision="fp8"` the transformer's blocks (and, by default, the text encoder's layers) are
converted one at a time as they reach the GPU, so the 16-bit model never sits whole on the card.
"""

from __future__ import annotations

import torch

from ..model import fused_kernels
from ..model.fp8 import Fp8Linear, quantize_block_fp8, quantize_text_encoder_fp8, set_input_quantizer
from ..model.switches import option_or_env

# The fused per-token quantisation of the FP8 text encoder's inputs is on where `text_encoder_fp8_kernel`
# is left None (measured faster with the same image: BENCHMARKS.md, Speed III); "0" here turns it off.
TEXT_FP8_KERNEL_ENV = "ZIMAGE_TRT_TEXT_FP8_KERNEL"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # Z-Image was trained in bf16; CPUs run fp32 best (and the CPU parity tests need it).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(device) -> torch.device:
    """A concrete device: "cuda" becomes "cuda:<current>" so that worker threads use the same GPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def module_device(module) -> torch.device:
    if module is None:
        return torch.device("cpu")
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def wants_fp8_text_encoder(flag, precision: str | None, text_encoder, device: torch.device) -> bool:
    """`text_encoder_fp8` checked; None follows the denoiser: FP8 when precision is "fp8" on a GPU."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"text_encoder_fp8 must be True, False or None (follow the denoiser), got {flag!r}")
    if flag is None:
        return precision == "fp8" and text_encoder is not None and device.type == "cuda"
    return flag


def text_fp8_kernel_wanted(flag: bool | None) -> bool:
    """The `text_encoder_fp8_kernel` option: True / False, or None for $ZIMAGE_TRT_TEXT_FP8_KERNEL (on
    unless it is 0/off/false/no: model/switches.py)."""
    return option_or_env("text_encoder_fp8_kernel", flag, TEXT_FP8_KERNEL_ENV, default=True)


def use_text_encoder_fp8_kernel(text_encoder, flag: bool | None, device: torch.device) -> bool:
    """Switch the FP8 text encoder's input quantisation to the one-pass Triton kernel (True) or torch
    ops (False); None follows $ZIMAGE_TRT_TEXT_FP8_KERNEL (on unless switched off). On only where the kernel can run
    (CUDA with Triton); returns whether it is on. Switch before the encoder's CUDA graphs are captured
    (or clear them): a captured graph keeps the kernels it was captured with."""
    on = bool(text_fp8_kernel_wanted(flag) and text_encoder is not None and device.type == "cuda" and fused_kernels.AVAILABLE)
    if text_encoder is not None:
        set_input_quantizer(text_encoder, fused_kernels.quantize_rows_fp8 if on else None)
    return on


def place_components(transformer, vae, text_encoder, *, device: torch.device, dtype: torch.dtype,
                     text_encoder_device: torch.device, precision: str | None, text_encoder_fp8: bool | None,
                     fp8_keep=()) -> bool:
    """Move (not copy) the parts to their devices in `dtype`, converting to FP8 on the way where asked.

    Returns whether the text encoder runs in FP8. The denoiser's blocks are converted here only on a
    GPU (block by block, to bound the peak memory); elsewhere the engine converts them when it opens.
    """
    text_fp8 = wants_fp8_text_encoder(text_encoder_fp8, precision, text_encoder, text_encoder_device)
    if text_fp8:
        check_fp8_device(text_encoder_device, "text_encoder_fp8")
    if precision == "fp8" and device.type == "cuda":
        # Blocks the engine's FP8 quality policy keeps bf16 (fp8_keep, names as "layers.3") are not converted.
        kept = {id(block) for name, block in named_transformer_blocks(transformer) if name in set(fp8_keep)}
        place_converting(transformer, transformer_blocks(transformer), device,
                         lambda block: None if id(block) in kept else quantize_block_fp8(block))
    if text_fp8 and text_encoder_device.type == "cuda":
        place_converting(text_encoder, getattr(text_encoder, "layers", []), text_encoder_device, quantize_text_encoder_fp8)
    move(transformer, device, dtype)
    move(vae, device, dtype)
    move(text_encoder, text_encoder_device, dtype)
    if text_fp8:
        quantize_text_encoder_fp8(text_encoder)  # what place_converting did not reach (skips converted layers)
    return text_fp8


def transformer_blocks(transformer) -> list:
    return [block for _, block in named_transformer_blocks(transformer)]


def named_transformer_blocks(transformer) -> list:
    return [(f"{group}.{i}", block) for group in ("noise_refiner", "context_refiner", "layers")
            for i, block in enumerate(getattr(transformer, group, []))]


def place_converting(module, blocks, device: torch.device, convert) -> None:
    """Move each of `blocks` (submodules of `module`) to `device` in bf16 and `convert` it there at once,
    so that only one block's 16-bit weights are on the GPU at a time; the rest moves afterwards."""
    check_fp8_device(device, "precision='fp8'")
    for block in blocks:
        move(block, device, torch.bfloat16)  # (FP8-aware: a block converted earlier keeps its FP8 layers)
        convert(block)  # (skips layers converted earlier)


def check_fp8_device(device: torch.device, option: str) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{option} needs FP8 tensor cores (compute capability 8.9 or newer); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index in (None, wanted.index))


def move(module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)` only when needed (diffusers warns about every cast, even a no-op one).

    FP8 layers (of a module an FP8 pipeline already converted) keep their dtypes: e4m3 weights and
    float32 scales that `module.to(dtype)` would turn into 16-bit numbers the layers then misread.
    """
    if module is None:
        return
    fp8_layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    kept = {id(t) for m in fp8_layers for t in [*m.parameters(), *m.buffers()]}
    tensors = [*module.parameters(), *module.buffers()]
    moves = any(not _same_device(t.device, device) for t in tensors)
    casts = any(t.is_floating_point() and t.dtype != dtype and id(t) not in kept for t in tensors)
    if not fp8_layers:
        if moves or casts:
            module.to(device=device, dtype=dtype)  # one call: no wide copy lands on the device before the cast
        return
    if moves:
        module.to(device=device)
    if casts:
        for sub in module.modules():
            if isinstance(sub, Fp8Linear):
                continue
            for param in sub.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    sub._buffers[name] = buffer.to(dtype)
