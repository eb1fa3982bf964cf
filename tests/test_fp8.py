"""FP8 (e4m3 projections with per-row scales, bf16 elsewhere): maths on the CPU; speed is on the device."""

import copy

import pytest
import torch

from zimage_trt import build_engines
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.fp8 import Fp8Linear
from zimage_trt.testing.tiny import make_tiny_components


def test_fp8_linear_close_to_the_float_product():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=gen)
        linear.bias.normal_(0, 0.1, generator=gen)
    x = torch.randn(5, 7, 64, generator=gen) * 3
    expected = linear(x)
    got = Fp8Linear(linear)(x.bfloat16()).float()
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 0.05  # e4m3 keeps 3 mantissa bits
    assert Fp8Linear(linear).weight_fp8.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("rows", [3, 16, 77, 4256])
def test_the_product_asks_cublaslt_for_no_bias_epilogue_and_adds_the_bias(rows, monkeypatch):
    """cuBLASLt's heuristic refuses some row-wise scaled FP8 shapes with a bias (CUBLAS_STATUS_NOT_SUPPORTED:
    on the H200, 9728 in -> 64 out at up to 256 rows; bench/scaled_mm_shapes.py) and none without: the layer
    never hands it a bias, takes any row count as it is, and its result is the product plus the bias."""
    gen = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    layer = Fp8Linear(linear)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    seen = []
    real = torch._scaled_mm

    def refusing_a_bias(a, *args, bias=None, **kw):
        seen.append((a.shape[0], bias is not None))
        if bias is not None:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic(...)`")
        return real(a, *args, bias=bias, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", refusing_a_bias)
    out = layer(x)
    assert seen == [(rows, False)] and out.shape == (rows, 48)
    no_bias = Fp8Linear(torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16))
    no_bias.weight_fp8.copy_(layer.weight_fp8)
    no_bias.weight_scale.copy_(layer.weight_scale)
    assert torch.equal(out, no_bias(x) + layer.bias)
    assert ((out.float() - linear(x).float()).norm() / linear(x).float().norm()).item() < 0.05  # e4m3 rounding


def test_fp8_denoiser_tracks_fp32():
    tr = make_tiny_components(seed=6)["transformer"]
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.5])
    cap, lens = torch.randn(1, 64, 32, generator=gen), torch.tensor([40])
    with torch.no_grad():
        reference = StaticZImageDenoiser(tr)(x, t, cap, lens)
        quantised = copy.deepcopy(tr)
        torch.nn.Module.to(quantised, torch.bfloat16)
        den = StaticZImageDenoiser(quantised)
        den.quantize_fp8()
        got = den(x, t, cap.bfloat16(), lens)
    assert torch.isfinite(got).all()
    assert ((got - reference).norm() / reference.norm()).item() < 0.1
    fp8_layers = [m for m in quantised.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_layers) == 7 * (len(tr.layers) + len(tr.noise_refiner) + len(tr.context_refiner))


def test_fp8_needs_bf16_and_fp8_hardware(tmp_path):
    tr = make_tiny_components(seed=0)["transformer"]
    with pytest.raises(ValueError, match="bfloat16"):
        StaticZImageDenoiser(tr).quantize_fp8()
    with pytest.raises(ValueError, match="compute capability 8.9 or newer"):
        build_engines(tr, "256x256", tmp_path, backend="tensorrt-rtx", precision="fp8",
                      compute_capabilities=["8.6"], progress=False)
    with pytest.raises(ValueError, match="precision 'int4'"):
        build_engines(tr, "256x256", tmp_path, precision="int4", progress=False)


@pytest.mark.slow
def test_fp8_tensorrt_rtx_engine_through_the_build_step(tmp_path):
    """TensorRT's FP8 path: fp16 export + our Q/DQ on the projections -> a real TensorRT-RTX engine."""
    pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx-cu13")
    tr = make_tiny_components(seed=0)["transformer"]
    result = build_engines(tr, ["256x256", "256x384"], tmp_path, backend="tensorrt-rtx", precision="fp8",
                           caption_capacity=64, progress=False)
    m = result.manifest
    assert m.precision == "fp8" and m.compute_capabilities == ["8.9", "12.0", "12.1"]  # FP8 hardware only
    assert result.details["onnx"]["fp8"]["weights_fp8"] > 0
    m.verify_files(tmp_path)
