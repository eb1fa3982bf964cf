"""FP16 without overflow: power-of-two downscaling before the RMSNorms is exact and prevents inf."""

import copy

import pytest
import torch

from zimage_trt.compiler.fp16_calibration import FP16_SAFE_MAGNITUDE, calibrate_downscale, downscale_from_peaks
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.testing.tiny import make_tiny_components


def inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 32, 32, generator=gen), torch.tensor([0.2, 0.8]),
            torch.randn(2, 64, 32, generator=gen).to(dtype), torch.tensor([64, 10]))


def test_downscaling_is_exact_in_real_arithmetic():
    """In float64 (as close to real arithmetic as we get), any per-block 2^-k gives the same output."""
    transformer = make_tiny_components(seed=1)["transformer"].to(torch.float64)
    den = StaticZImageDenoiser(transformer)
    x, t, cap, lens = inputs(dtype=torch.float64)
    with torch.no_grad():
        plain = den(x.double(), t, cap, lens)
        den.set_downscale({name: (7, 11) for name, _ in den.named_blocks()})
        scaled = den(x.double(), t, cap, lens)
    assert (scaled - plain).abs().max().item() <= 1e-12 * plain.abs().max().item()


def planted_overflow_model():
    """A tiny model whose first main layer's feed-forward output far exceeds fp16's 65504."""
    transformer = make_tiny_components(seed=2)["transformer"]
    ff = transformer.layers[0].feed_forward
    with torch.no_grad():
        ff.w3.weight.mul_(300.0)
        ff.w2.weight.mul_(300.0)
    return transformer


def test_planted_large_weights_overflow_naive_fp16_but_not_ours():
    transformer = planted_overflow_model()
    x, t, cap, lens = inputs()
    den32 = StaticZImageDenoiser(transformer)
    with torch.no_grad():
        reference = den32(x, t, cap, lens)
    downscale = calibrate_downscale(den32)
    assert downscale.get("layers.0", (0, 0))[1] > 0, f"calibration missed the planted overflow: {downscale}"

    half = copy.deepcopy(transformer).half()
    naive = StaticZImageDenoiser(half)
    ours = StaticZImageDenoiser(half, downscale)
    with torch.no_grad():
        naive_out = naive(x, t, cap.half(), lens)
        ours_out = ours(x, t, cap.half(), lens)
    assert not torch.isfinite(naive_out).all(), "the planted weights should overflow a naive fp16 run"
    assert torch.isfinite(ours_out).all()
    rel = ((ours_out - reference).norm() / reference.norm()).item()
    assert rel < 2e-2, rel


def test_peaks_to_downscale():
    assert downscale_from_peaks({"layers.0": (100.0, 70000.0)}) == {"layers.0": (0, 5)}
    assert downscale_from_peaks({"layers.0": (FP16_SAFE_MAGNITUDE, 1.0)}) == {}
    with pytest.raises(ValueError, match="non-finite"):
        downscale_from_peaks({"layers.0": (float("inf"), 1.0)})


def test_calibration_refuses_fp16_models():
    transformer = make_tiny_components(seed=0)["transformer"].half()
    with pytest.raises(ValueError, match="fp32 or bf16"):
        calibrate_downscale(StaticZImageDenoiser(transformer))


def test_unknown_block_names_are_rejected():
    den = StaticZImageDenoiser(make_tiny_components(seed=0)["transformer"])
    with pytest.raises(ValueError, match="unknown blocks"):
        den.set_downscale({"layers.99": (1, 1)})
