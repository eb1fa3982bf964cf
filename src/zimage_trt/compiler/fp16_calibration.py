"""FP16 overflow protection, measured at build time on the model's own weights.

Z-Image's attention and feed-forward outputs can exceed fp16's 65504. `StaticBlock` can shrink them by
a per-block power of two that the following RMSNorm undoes exactly (see `model/denoiser.py`); this
module measures each block's peaks in a wide dtype and picks the smallest shrink that keeps fp16 safe.
"""

from __future__ import annotations

import math

import torch

from ..model.denoiser import StaticZImageDenoiser

# Measured fp16 activations are kept below this (65504 / 16): headroom for inputs the calibration
# did not see.
FP16_SAFE_MAGNITUDE = 4096.0


@torch.no_grad()
def measure_block_outputs(denoiser: StaticZImageDenoiser, *inputs) -> dict[str, tuple[float, float]]:
    """Largest |value| of each block's attention output and feed-forward product/output, one forward."""
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

    for name, block in denoiser.named_blocks():
        hooks.append(block.block.attention.to_out[0].register_forward_hook(tracker(name, 0)))
        ff = block.block.feed_forward
        # The feed-forward can overflow in the up projection, the gated product (w2's input) or w2's output.
        hooks.append(ff.w3.register_forward_hook(tracker(name, 1)))
        hooks.append(ff.w2.register_forward_pre_hook(input_tracker(name, 1)))
        hooks.append(ff.w2.register_forward_hook(tracker(name, 1)))
    saved = denoiser.downscale()
    denoiser.set_downscale({})
    try:
        denoiser(*inputs)
    finally:
        denoiser.set_downscale(saved)
        for h in hooks:
            h.remove()
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


def calibrate_downscale(denoiser: StaticZImageDenoiser, inputs=None, limit: float = FP16_SAFE_MAGNITUDE):
    """Measure (in the model's current, wide dtype) and return per-block log2 downscale for fp16."""
    if denoiser.dtype == torch.float16:
        raise ValueError("calibrate the fp16 downscale on an fp32 or bf16 model: fp16 may already overflow")
    inputs = inputs if inputs is not None else calibration_inputs(denoiser)
    return downscale_from_peaks(measure_block_outputs(denoiser, *inputs), limit)
