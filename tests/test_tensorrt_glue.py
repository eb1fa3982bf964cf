"""The TensorRT glue that no GPU here can execute, tested without one (issue 12): compute-capability
resolution, version checks at selection, and the execution-context contract against a recording stand-in.

Nothing here runs a TensorRT engine: CI has no GPU, and the GPUs reachable to this project (H100/H200)
are refused by TensorRT-RTX. The stand-ins below record the calls our runtime makes, in order, so the
documented rules of `IExecutionContext` (NvInferRuntime.h) are checked on every CI run.
"""

import pytest
import torch

from zimage_trt.engines.manifest import EngineShape, Manifest
from zimage_trt.engines.select import Need, reasons_unfit
from zimage_trt.engines.tensorrt import library as trt_library

_, RTX = trt_library.import_backend("tensorrt-rtx")


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
