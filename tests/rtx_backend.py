"""TensorRT-RTX for the test modules that drive it (the library, not a GPU).

CI (no GPU) installs the rtx extra, so there a missing TensorRT-RTX is an error, not a skip. A CUDA
machine without it (the lent H100/H200s carry none) skips the module instead of failing `pytest -m gpu`
at collection; conftest.GPU_MACHINE_SKIPS allows that reason only where tensorrt_rtx is not installed.
"""

import pytest
import torch

from zimage_trt.engines.tensorrt.library import BackendUnavailableError, import_backend


def rtx_or_skip_module():
    """The tensorrt_rtx module; on a CUDA machine without it, skips the calling test module."""
    try:
        return import_backend("tensorrt-rtx")[1]
    except BackendUnavailableError as exc:
        if not torch.cuda.is_available():
            raise
        pytest.skip(f"TensorRT-RTX is not installed here: {exc}", allow_module_level=True)
