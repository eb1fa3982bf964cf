"""Do the engine's fp16 downscale factors still hold with the adapters merged?

The build measured each block's activation peaks on the base weights and picked per-block power-of-two
shrinks (`compiler/fp16_calibration.py`); an adapter changes the weights, so the peaks may grow past
fp16's range. After a merge the peaks are measured again, cheaply: one eager forward of the static
denoiser on the build's small calibration input (32 x 32 latents, 64 caption rows), in the model's
own dtype, with the engine's factors applied. The engine keeps running with its factors (changing them
would recompile a torch-compiled engine and cannot be done to a TensorRT one), so an adapter that
needs more is reported with a warning that says what to do.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..model.denoiser import StaticZImageDenoiser
from ..model.fp16_range import FP16_SAFE_MAGNITUDE, calibration_inputs, measure_block_outputs


class LoraFp16RangeWarning(UserWarning):
    """A merged adapter pushes the denoiser's fp16 activations past the engine's safety margin."""


def engine_downscale(engine) -> dict[str, tuple[int, int]] | None:
    """The per-block factors an engine runs with, or None when it does not say."""
    denoiser = getattr(engine, "denoiser", None)
    if denoiser is not None and hasattr(denoiser, "downscale"):
        return denoiser.downscale()
    manifest = getattr(engine, "manifest", None)
    factors = getattr(manifest, "fp16_downscale_log2", None)
    if factors is not None:
        return {k: tuple(v) for k, v in factors.items()}
    return None


def blocks_out_of_range(transformer, downscale: dict[str, tuple[int, int]],
                        limit: float = FP16_SAFE_MAGNITUDE) -> dict[str, tuple[float, float]]:
    """Blocks whose attention or feed-forward peak, with `downscale` applied, is above `limit` (or not
    finite), with their peaks."""
    denoiser = StaticZImageDenoiser(transformer, downscale)  # shares the transformer's (merged) weights
    peaks = measure_block_outputs(denoiser, *calibration_inputs(denoiser), with_downscale=True)
    return {name: p for name, p in peaks.items() if any(not math.isfinite(v) or v > limit for v in p)}


def warn_if_out_of_range(transformer, engines, adapters: list[str]) -> dict[str, tuple[float, float]]:
    """Measure with each distinct set of factors the open fp16 engines use; warn about blocks out of range."""
    seen, bad = set(), {}
    for engine in engines:
        if getattr(engine, "dtype", None) != torch.float16:
            continue
        factors = engine_downscale(engine)
        key = tuple(sorted((factors or {}).items()))
        if factors is None or key in seen:
            continue
        seen.add(key)
        bad.update(blocks_out_of_range(transformer, factors))
    if bad:
        shown = ", ".join(f"{n} (attention {a:.3g}, feed-forward {f:.3g})" for n, (a, f) in sorted(bad.items())[:4])
        warnings.warn(
            f"with the LoRA adapter(s) {adapters} merged, fp16 activations exceed {FP16_SAFE_MAGNITUDE:g} (fp16 "
            f"overflows at 65504) in {len(bad)} block(s) even with the engine's downscale factors: {shown}. Images "
            "may fail with NonFiniteOutputError. Lower the adapter weights, run in bf16, or build an fp16 engine from "
            "weights with the adapter fused (its calibration then measures them).",
            LoraFp16RangeWarning, stacklevel=4)
    return bad
