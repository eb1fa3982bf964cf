"""FP8 Q/DQ ONNX (zimage_trt.compiler.fp8_onnx): onnxruntime runs it on the CPU, TensorRT-RTX builds it for Ada+."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from zimage_trt.compiler import tensorrt_build
from zimage_trt.engines.tensorrt import library as trt_library
from zimage_trt.compiler.fp16_calibration import calibrate_downscale
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.compiler.export import export_denoiser, onnxruntime_outputs
from zimage_trt.compiler.fp8_onnx import quantize_onnx_fp8
from zimage_trt.testing.tiny import make_tiny_components

RTX = trt_library.available_flavors()["tensorrt-rtx"]
needs_rtx = pytest.mark.skipif(not RTX[0], reason=f"tensorrt_rtx unavailable: {RTX[1]}")
CAP_DIM = 32


def feed(rng, hw=(32, 32), t=0.5, cap_dtype=np.float16):
    return {"latents": rng.standard_normal((1, 16, *hw)).astype(np.float32), "timestep": np.array([t], np.float32),
            "cap_feats": rng.standard_normal((1, 64, CAP_DIM)).astype(cap_dtype), "cap_lens": np.array([40], np.int64)}


def profile(h, w):
    return {"latents": (1, 16, h, w), "timestep": (1,), "cap_feats": (1, 64, CAP_DIM), "cap_lens": (1,)}


@pytest.fixture(scope="module")
def fp8_onnx(tmp_path_factory, one_cpu_thread):
    d = tmp_path_factory.mktemp("fp8onnx")
    reference = StaticZImageDenoiser(make_tiny_components(seed=0)["transformer"]).eval()
    tr = make_tiny_components(seed=0)["transformer"]
    den = StaticZImageDenoiser(tr)
    den.set_downscale(calibrate_downscale(den))  # fp16 overflow guard, as build_engines does
    torch.nn.Module.to(tr, torch.float16)
    export_denoiser(den, d / "fp16.onnx", verify=False)
    rng = np.random.default_rng(0)
    info = quantize_onnx_fp8(d / "fp16.onnx", d / "fp8.onnx", [feed(rng, t=t) for t in (0.1, 0.5, 0.9)])
    return {"dir": d, "fp16": d / "fp16.onnx", "fp8": d / "fp8.onnx", "info": info, "reference": reference}


def test_qdq_structure(fp8_onnx):
    info = fp8_onnx["info"]
    # Tiny model: 4 blocks x (q, k, v, out); its FFN width 170 is no multiple of 16, so w1/w2/w3 stay fp16.
    assert info["weights_fp8"] == 16 and info["activation_qdq_pairs"] == 8
    model = onnx.load(str(fp8_onnx["fp8"]))
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 8 and len(dq) == 8 + 16
    weights = [n for n in dq if n.input[0] in inits]
    assert len(weights) == 16
    for n in weights:
        assert inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN
        assert [a.i for a in n.attribute if a.name == "axis"] == [1]  # per output channel of W[K, N]
    for n in q:
        assert inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN
        assert inits[n.input[1]].data_type == TensorProto.FLOAT16 and not inits[n.input[1]].dims  # per tensor
    assert all(s > 0 for s in info["activation_scales"].values())


def test_onnxruntime_runs_fp8_close_to_fp32(fp8_onnx):
    inputs = tuple(torch.from_numpy(v) for v in feed(np.random.default_rng(7), hw=(32, 48), t=0.3).values())
    with torch.no_grad():
        expected = fp8_onnx["reference"](inputs[0], inputs[1], inputs[2].float(), inputs[3]).numpy()
    got = onnxruntime_outputs(fp8_onnx["fp8"], inputs)[0].astype(np.float32)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.1  # e4m3: 3 mantissa bits


def test_nothing_to_quantise_is_an_error(fp8_onnx, tmp_path):
    with pytest.raises(ValueError, match="no MatMul/Gemm"):
        quantize_onnx_fp8(fp8_onnx["fp16"], tmp_path / "x.onnx", [feed(np.random.default_rng(0))], modules=r"nope$")
    assert not (tmp_path / "x.onnx").exists()


@needs_rtx
def test_tensorrt_rtx_builds_fp8_engine_for_ada(fp8_onnx):
    engine = fp8_onnx["dir"] / "fp8.plan"
    info = tensorrt_build.build_tensorrt_engine(fp8_onnx["fp8"], engine, [profile(32, 32), profile(32, 48)],
                                    flavor="tensorrt-rtx", compute_capabilities=["8.9"], progress=False)
    assert engine.is_file() and info["engine_bytes"] == engine.stat().st_size > 0
    assert len(info["profiles"]) == 2
    print(f"\nFP8 TensorRT-RTX engine for 8.9: {info['engine_bytes'] / 1e6:.1f} MB in {info['build_seconds']:.1f}s")


@needs_rtx
def test_tensorrt_rtx_refuses_fp8_before_ada(fp8_onnx):
    # Proof that the engine really holds FP8: Ampere (8.6) has no e4m3 and the builder says so.
    with pytest.raises(trt_library.EngineBuildError, match="fp8"):
        tensorrt_build.build_tensorrt_engine(fp8_onnx["fp8"], fp8_onnx["dir"] / "amp.plan", [profile(32, 32)],
                                 flavor="tensorrt-rtx", compute_capabilities=["8.6"], progress=False)
    assert not (fp8_onnx["dir"] / "amp.plan").exists()
