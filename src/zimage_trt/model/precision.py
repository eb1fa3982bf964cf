"""The one table of engine precisions: their names, the torch dtypes they run in, and their rules."""

from __future__ import annotations

import torch

PRECISIONS = ("fp16", "bf16", "fp32", "fp8")  # (the CLI lists them in this order: the default first)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# FP8 engines quantise the block projections and keep the rest 16-bit: bf16 in the torch-compiled format
# (torch._scaled_mm's row-wise path outputs bf16), fp16 plus Q/DQ nodes in TensorRT's ONNX.
_FP8_COMPANION = {"torch-compiled": torch.bfloat16, "tensorrt": torch.float16, "tensorrt-rtx": torch.float16}


# The one default of `zimage-trt build` and `zimage-trt generate` (and of `build_engines`), so that what
# is built by default is what is looked for by default. fp16 on a GPU: the engines the project card asks
# for, made safe by the build's overflow rescaling (bf16, Z-Image's training dtype, is a choice). fp32 on
# the CPU: CPUs have no fast 16-bit path, and CPU parity with diffusers is checked in fp32. (The Python
# pipeline follows it when given engines; without engines it stays bf16 on a GPU: eager torch has no
# overflow rescaling.)
DEFAULT_PRECISION_RULE = "fp16 for an engine that runs on a GPU, fp32 for one that runs on the CPU"


def default_precision(on_gpu: bool) -> str:
    """See DEFAULT_PRECISION_RULE."""
    return "fp16" if on_gpu else "fp32"


# What `zimage-trt generate` and `zimage-trt serve` (and the Python pipeline) run when no precision is
# given: with engines the build's own default, so that default builds are found; without engines the
# eager model, which has no fp16 overflow rescaling, in bf16 (Z-Image's training dtype) on a GPU.
RUN_PRECISION_RULE = (f"with engines what build makes by default ({DEFAULT_PRECISION_RULE}); without engines "
                      f"bf16 on a GPU, fp32 on the CPU")


def run_precision(precision: str | None, device, with_engines: bool) -> str:
    """`precision` when given, else RUN_PRECISION_RULE's for `device` (None: CUDA when available)."""
    if precision is not None:
        return check_precision(precision)
    on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if with_engines:
        return default_precision(on_gpu)
    return "bf16" if on_gpu else "fp32"


def check_precision(name) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {PRECISIONS}")
    return name


def precision_dtype(name: str, backend: str = "torch-compiled") -> torch.dtype:
    """The dtype an engine of this precision (and backend) runs its non-FP8 parts in."""
    check_precision(name)
    return _FP8_COMPANION[backend] if name == "fp8" else _DTYPES[name]


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a 16/32-bit dtype (what a pipeline of that dtype looks for by default)."""
    for name, known in _DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"no engine precision runs in {dtype}; use one of {[str(d) for d in _DTYPES.values()]}")
