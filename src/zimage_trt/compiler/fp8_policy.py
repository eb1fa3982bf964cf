"""FP8 that keeps its quality: measure each block's sensitivity to FP8 at build time, keep the worst 16-bit.

Trained checkpoints have outlier channels that per-token FP8 handles badly in some blocks (other
projects saw noisy Z-Image images from naive FP8 and fixed them by keeping a few blocks in 16-bit).
Which blocks those are depends on the weights, so it is measured on the user's own checkpoint:

    sensitivity(block) = ||D(x; only `block` FP8) - D(x; all 16-bit)|| / ||D(x; all 16-bit)||

over deterministic calibration inputs (the denoiser's whole output, so a block's damage is counted
as it propagates). `--fp8-keep auto` keeps 16-bit the blocks whose sensitivity stands out from the
rest (over AUTO_FACTOR times the median), at most AUTO_MAX_FRACTION of them, most sensitive first;
`none` keeps none; a comma-separated list keeps exactly those. The build records the list in the
manifest, and the runtime quantises every other block.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..model.denoiser import StaticZImageDenoiser
from ..model.fp8 import block_projections, is_fp8_block, quantize_block_fp8

AUTO_FACTOR = 2.0
AUTO_MAX_FRACTION = 0.25


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@torch.no_grad()
def fp8_sensitivity(denoiser: StaticZImageDenoiser, inputs) -> dict[str, float]:
    """Each block's sensitivity (above) on `inputs` = (latents, timestep, cap_feats, cap_lens).

    The denoiser must be 16-bit (bf16); it is left exactly as it was (each block's 16-bit projections
    are put back after its FP8 trial).
    """
    if any(is_fp8_block(block.block) for _, block in denoiser.named_blocks()):
        raise ValueError("measure FP8 sensitivity on the 16-bit denoiser, before quantize_fp8")
    reference = denoiser(*inputs)
    result = {}
    for name, block in denoiser.named_blocks():
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr in block_projections(block.block)]
        quantize_block_fp8(block.block)
        try:
            result[name] = _rel(denoiser(*inputs), reference)
        finally:
            for owner, attr, module in originals:
                setattr(owner, attr, module)
    return result


def choose_fp8_keep(policy: str, sensitivity: dict[str, float] | None, block_names) -> list[str]:
    """The blocks to keep 16-bit for `policy` ('auto', 'none' or 'name,name,...')."""
    names = list(block_names)
    policy = (policy or "none").strip()
    if policy == "none":
        return []
    if policy != "auto":
        wanted = [p.strip() for p in policy.split(",") if p.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"--fp8-keep names unknown blocks {unknown}; use 'auto', 'none' or names from {names}")
        return sorted(set(wanted), key=names.index)
    if not sensitivity:
        raise ValueError("--fp8-keep auto needs the measured sensitivity of every block")
    median = statistics.median(sensitivity.values())
    ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
    cap = max(1, math.ceil(len(names) * AUTO_MAX_FRACTION))
    return [n for n in ranked if sensitivity[n] > AUTO_FACTOR * median][:cap]


def check_fp8_keep_policy(policy: str) -> str:
    """Early check of the option's spelling (names are checked against the model later)."""
    if not isinstance(policy, str) or not policy.strip():
        raise ValueError("--fp8-keep must be 'auto', 'none' or a comma-separated list of block names "
                         "such as 'layers.29,noise_refiner.0'")
    return policy.strip()
