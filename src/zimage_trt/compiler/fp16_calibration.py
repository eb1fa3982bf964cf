"""FP16 overflow protection, measured at build time on the model's own weights.

Z-Image's attention and feed-forward outputs can exceed fp16's 65504. `StaticBlock` can shrink them by
a per-block power of two that the following RMSNorm undoes exactly (see `model/denoiser.py`); this
module measures each block's peaks in a wide dtype and picks the smallest shrink that keeps fp16 safe.
"""

from __future__ import annotations

import torch

from ..model.denoiser import StaticZImageDenoiser
# The measuring lives in model/ (the runtime measures again after merging a LoRA); re-exported here.
from ..model.fp16_range import FP16_SAFE_MAGNITUDE, calibration_inputs, downscale_from_peaks, measure_block_outputs

__all__ = ["FP16_SAFE_MAGNITUDE", "calibration_inputs", "measure_block_outputs", "downscale_from_peaks",
           "calibrate_downscale"]


def calibrate_downscale(denoiser: StaticZImageDenoiser, inputs=None, limit: float = FP16_SAFE_MAGNITUDE):
    """Measure (in the model's current, wide dtype) and return per-block log2 downscale for fp16."""
    if denoiser.dtype == torch.float16:
        raise ValueError("calibrate the fp16 downscale on an fp32 or bf16 model: fp16 may already overflow")
    inputs = inputs if inputs is not None else calibration_inputs(denoiser)
    return downscale_from_peaks(measure_block_outputs(denoiser, *inputs), limit)
