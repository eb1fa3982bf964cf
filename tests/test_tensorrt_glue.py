"""The TensorRT glue that no GPU here can execute, tested without one (issue 12): 'current' compute
capability resolved for the manifest (or refused, saying what to do, without a GPU), another TensorRT
version at selection (a reason naming both; with allow_fallback eager torch instead of a failed
deserialisation), and engine-validity diagnostics named, not printed as numbers.

Nothing here runs a TensorRT engine: CI has no GPU, and the GPUs reachable to this project (H100/H200)
are refused by TensorRT-RTX. The execution-context contract (the calls our runtime makes, in order,
against a recording stand-in for `IExecutionContext`) is tested in test_tensorrt_contract.py.
"""

import warnings

import pytest
import torch

from zimage_trt.engines import select
from zimage_trt.engines.manifest import EngineShape, Manifest, record_file
from zimage_trt.engines.select import Need, open_denoiser, reasons_unfit
from zimage_trt.engines.tensorrt import library as trt_library
from zimage_trt.testing.tiny import make_tiny_components

from rtx_backend import rtx_or_skip_module

RTX = rtx_or_skip_module()


# ------------------------------------------------------------------ defect 3: 'current' is resolved


def test_current_compute_capability_is_resolved_for_the_manifest(monkeypatch):
    monkeypatch.setattr(trt_library, "current_gpu_compute_capability", lambda: "8.9")
    labels, members, how = trt_library.resolve_rtx_targets(RTX, "current")
    assert labels == ["8.9"] and members == [RTX.ComputeCapability.SM89] and "8.9" in how
    manifest = Manifest(name="d", component="denoiser", backend="tensorrt-rtx", backend_version=RTX.__version__,
                        precision="fp16", shapes=[EngineShape("256x256", 1, 64)], files=[],
                        compute_capabilities=labels, torch_version=torch.__version__, model={})
    need = Need("256x256", 1, "fp16", "8.9", None)
    assert reasons_unfit(manifest, need, {"tensorrt-rtx"}, {"tensorrt-rtx": RTX.__version__}) == []


def test_current_compute_capability_without_a_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(trt_library, "current_gpu_compute_capability", lambda: None)
    with pytest.raises(ValueError, match="'current' needs a visible CUDA GPU.*8.9"):
        trt_library.resolve_rtx_targets(RTX, "current")


# ------------------------------------------------------------------ defect 4: versions at selection


def _trt_manifest(folder, version):
    engine = folder / "denoiser.abc.plan"
    engine.write_bytes(b"not really an engine" * 10)
    manifest = Manifest(name="denoiser", component="denoiser", backend="tensorrt-rtx", backend_version=version,
                        precision="fp32", shapes=[EngineShape("256x256", 1, 64)], files=[record_file(engine)],
                        compute_capabilities=[], torch_version=torch.__version__, model={})
    manifest.write(folder)
    return manifest


def test_other_tensorrt_version_is_a_reason_naming_both(tmp_path):
    manifest = _trt_manifest(tmp_path, "1.6.0.50")
    need = Need("256x256", 1, "fp32", None, None)
    reasons = reasons_unfit(manifest, need, {"tensorrt-rtx"}, {"tensorrt-rtx": "1.7.1.116"})
    assert len(reasons) == 1 and "1.6.0.50" in reasons[0] and "1.7.1.116" in reasons[0]
    assert reasons_unfit(manifest, need, {"tensorrt-rtx"}, {"tensorrt-rtx": "1.6.0.50"}) == []


def test_version_mismatch_falls_back_instead_of_failing_to_deserialise(tmp_path, monkeypatch):
    """With allow_fallback the pipeline runs eager torch; without, the refusal names both versions.
    (The engine file is not an engine: reaching deserialisation would fail differently.)"""
    _trt_manifest(tmp_path, "0.0.1")
    monkeypatch.setattr(select, "runnable_backends", lambda device: {"torch-compiled", "tensorrt-rtx"})
    monkeypatch.setattr(select, "flavor_versions", lambda: {"tensorrt-rtx": RTX.__version__})
    transformer = make_tiny_components()["transformer"]
    with pytest.raises(select.EngineNotFound, match=f"tensorrt-rtx 0.0.1, this machine has tensorrt-rtx {RTX.__version__}"):
        open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1, allow_fallback=True)
    assert engine.kind == "eager" and any("0.0.1" in str(w.message) for w in caught)


# ------------------------------------------------------------------ defect 7: validity reasons in words


def test_engine_validity_diagnostics_are_named_not_printed_as_numbers():
    from zimage_trt.engines.tensorrt.runtime import describe_invalidity

    logger = trt_library.get_logger(RTX)
    runtime = RTX.Runtime(logger)
    with logger.capture() as logged:
        validity, diagnostics = runtime.get_engine_validity(b"not an engine header".ljust(runtime.engine_header_size))
    assert validity == RTX.EngineValidity.INVALID
    assert describe_invalidity(RTX, diagnostics, logged).startswith("MALFORMED_ENGINE")
    # No flag set (what TensorRT-RTX returns when it cannot read the GPU): the logged reason is the message.
    text = describe_invalidity(RTX, 0, ["Error reading CUDA GPU properties: cudaError 35"])
    assert text == "no diagnostic flag set; TensorRT logged: Error reading CUDA GPU properties: cudaError 35"
