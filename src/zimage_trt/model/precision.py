"""The one table of engine precisions: their names, the torch dtypes they run in, and their rules."""

from __future__ import annotations

import torch

PRECISIONS = ("fp16", "bf16", "fp32", "fp8")  # (the CLI lists them in this order: the default first)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# FP8 engines quantise the block projections and keep the rest 16-bit: bf16 in the torch-compiled format
# (torch._scaled_mm's row-wise path outputs bf16), fp16 plus Q/DQ nodes in TensorRT's ONNX.
_FP8_COMPANION = {"torch-compiled": torch.bfloat16, "tensorrt": torch.float16, "tensorrt-rtx": torch.float16}


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
