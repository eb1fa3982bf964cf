"""Measuring the denoiser's fp16 range: each block's activation peaks, one forward on a small input.

The build uses it to pick the per-block power-of-two downscale (`compiler/fp16_calibration.py`); the
runtime uses it again after a LoRA is merged into the weights, to tell whether the factors the engine
was built with still keep fp16 finite (`lora/`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .denoiser import StaticZImageDenoiser

# Measured fp16 activations are kept below this (65504 / 16): headroom for inputs the calibration
# did not see.
FP16_SAFE_MAGNITUDE = 4096.0


@contextlib.contextmanager
def tracking_peaks(named_blocks):
    """Within the block: the largest |value| of each named StaticBlock's attention output and feed-forward
    product/output, {name: [attention peak, feed-forward peak]} (filled as forwards run)."""
    peaks: dict[str, list[float]] = {}
    hooks = []

    def tracker(name, slot):
        def hook(_module, _inp, out):
            peaks.setdefault(name, [0.0, 0.0])
            peaks[name][slot] = max(peaks[name][slot], float(out.detach().abs().float().max()))

        return hook

    def input_tracker(name, slot):
        def hook(_module, inp):
            peaks.setdefault(name, [0.0, 0.0])
            peaks[name][slot] = max(peaks[name][slot], float(inp[0].detach().abs().float().max()))

        return hook

    for name, block in named_blocks:
        hooks.append(block.block.attention.to_out[0].register_forward_hook(tracker(name, 0)))
        ff = block.block.feed_forward
        # The feed-forward can overflow in the up projection, the gated product (w2's input) or w2's output.
        hooks.append(ff.w3.register_forward_hook(tracker(name, 1)))
        hooks.append(ff.w2.register_forward_pre_hook(input_tracker(name, 1)))
        hooks.append(ff.w2.register_forward_hook(tracker(name, 1)))
    try:
        yield peaks
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def measure_block_outputs(denoiser: StaticZImageDenoiser, *inputs,
                          with_downscale: bool = False) -> dict[str, tuple[float, float]]:
    """Largest |value| of each block's attention output and feed-forward product/output, one forward.

    `with_downscale=False` measures the unscaled activations (the build's calibration, in a wide dtype);
    True keeps the denoiser's current factors, so the peaks are what its fp16 engine actually holds.
    """
    saved = denoiser.downscale()
    if not with_downscale:
        denoiser.set_downscale({})
    try:
        with tracking_peaks(denoiser.named_blocks()) as peaks:
            denoiser(*inputs)
    finally:
        denoiser.set_downscale(saved)
    return {k: (v[0], v[1]) for k, v in peaks.items()}


def downscale_from_peaks(peaks: dict[str, tuple[float, float]], limit: float = FP16_SAFE_MAGNITUDE):
    """Smallest power-of-two shrink per block that brings each measured peak under `limit`."""

    def log2_needed(peak: float) -> int:
        if not math.isfinite(peak):
            raise ValueError("calibration saw a non-finite activation: calibrate in fp32 or bf16, not fp16")
        return max(0, math.ceil(math.log2(peak / limit))) if peak > limit else 0

    result = {}
    for name, (attn_peak, ffn_peak) in peaks.items():
        k = (log2_needed(attn_peak), log2_needed(ffn_peak))
        if any(k):
            result[name] = k
    return result


def calibration_inputs(denoiser: StaticZImageDenoiser, *, latent_hw=(32, 32), caption_len=64, seed=0):
    """Deterministic inputs for calibration: unit-normal latents and caption features at a small size."""
    gen = torch.Generator().manual_seed(seed)
    device = denoiser.device
    cap_dim = denoiser.caption_dim
    latents = torch.randn(3, denoiser.in_channels, *latent_hw, generator=gen)
    cap = torch.randn(3, caption_len, cap_dim, generator=gen)
    timestep = torch.tensor([0.0, 0.5, 1.0])
    lens = torch.tensor([caption_len, caption_len // 2, 1])
    return tuple(t.to(device) for t in (latents, timestep, cap, lens))
