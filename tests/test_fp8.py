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
def test_fp8_linear_takes_any_row_count(rows, monkeypatch):
    """Row counts past ROW_MULTIPLE that are not a multiple of it are padded for the product (cuBLASLt has no
    row-wise scaled kernel for 77 rows on an H200) and sliced back: each row's result is the one it gets
    alone in an aligned batch, and the padding never reaches the caller."""
    from zimage_trt.model import fp8

    gen = torch.Generator().manual_seed(rows)
    layer = Fp8Linear(torch.nn.Linear(64, 48).to(torch.bfloat16))
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    seen = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, *args, **kw: seen.append(a.shape[0]) or real(a, *args, **kw))
    out = layer(x)
    assert out.shape == (rows, 48)
    assert seen[-1] == (rows if rows <= fp8.ROW_MULTIPLE else -(-rows // fp8.ROW_MULTIPLE) * fp8.ROW_MULTIPLE)
    aligned = torch.cat([x, torch.zeros(-rows % 32, 64, dtype=x.dtype)])  # 32 rows at a time, no padding needed
    expected = layer(aligned)[:rows]
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)  # (the same rows' products)


def test_a_product_cublaslt_refuses_runs_dequantised_with_the_same_maths(monkeypatch):
    """cuBLASLt's heuristic can refuse a row-wise scaled shape (CUBLAS_STATUS_NOT_SUPPORTED, seen on an H200
    for 77 -> 80 padded rows, 9728 in, 64 out): the layer warns once, gives the product from the same e4m3
    values in fp32, and does not ask cuBLASLt again for that shape; other errors are not swallowed."""
    from zimage_trt.model import fp8

    monkeypatch.setattr(fp8, "_REFUSED_SHAPES", set())
    gen = torch.Generator().manual_seed(0)
    layer = Fp8Linear(torch.nn.Linear(96, 48).to(torch.bfloat16))
    x = torch.randn(77, 96, generator=gen).to(torch.bfloat16)
    expected = layer(x)  # the real _scaled_mm (the CPU has every shape)
    real, calls = torch._scaled_mm, []

    def refusing(a, *args, **kw):
        calls.append(a.shape[0])
        if a.shape[0] == 80:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic(...)`")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", refusing)
    with pytest.warns(UserWarning, match="no row-wise scaled FP8 kernel for 80 rows x 96 -> 48 with bias"):
        first = layer(x)
    second = layer(x)
    assert calls == [80]  # asked once; the second call went straight to the dequantised product
    for got in (first, second):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert layer(x[:16]).shape == (16, 48) and calls[-1] == 16  # other shapes still go to _scaled_mm

    def broken(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layer(x[:32])


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
