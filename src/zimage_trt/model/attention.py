"""Attention backends behind one switch: which kernel computes softmax(q k^T / sqrt(d)) v in every block.

    sdpa      torch's scaled_dot_product_attention (cuDNN first on CUDA: see engines/torch_compiled.py)
    fa3       FlashAttention-3 in 16-bit (Hopper only). `flash_attn_interface` (the `tokenspeed-fa3` wheel)
              has fp16 and bf16 kernels; `fa3_fwd_interface` (`fa3-fwd`) has bf16 only, so an fp16
              model runs its attention in bf16 there (q, k, v rounded to bf16, output back to fp16).
    fa3-fp8   FlashAttention-3 with q, k, v quantised to float8 e4m3, one scale per (item, head).
    auto      fa3 where it can run (fa3-fp8 in FP8 engines: ~3 ms a step faster for no measured
              image-quality cost, BENCHMARKS.md "Speed II, second pass"), else sdpa.

FlashAttention takes no key mask. A block's op is called with mask=None whenever every caption fills
the engine's caption capacity (the runtime's usual case: see `mask_caption_keys`); with a mask the FA3
ops fall back to SDPA for that call, which is exact (same function), only slower.

fp16 safety: an attention output is a convex combination of the rows of v, so |out| <= max|v|. v is
finite in fp16; rounding it to bf16 can round the largest fp16 values up past 65504, so the bf16 path
clamps to the fp16 range before casting back. The per-block downscale of the attention output
(`StaticBlock`, fp16 overflow protection) is applied after this op, as before.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from . import fused_kernels
from .fp8 import FP8_MAX

log = logging.getLogger("zimage_trt")

BACKENDS = ("auto", "sdpa", "fa3", "fa3-fp8")
FP16_MAX = 65504.0
# Import names tried for FlashAttention-3, best first: (module, 16-bit dtypes it has kernels for).
FA3_MODULES = (("flash_attn_interface", (torch.float16, torch.bfloat16)), ("fa3_fwd_interface", (torch.bfloat16,)))
FA3_INSTALL_HINT = "pip install 'zimage_trt[fa3]' (FlashAttention-3 forward kernels, Hopper GPUs)"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q, k, v: [B, S, H, D]; mask: bool [B, 1, 1, S] (True = attend) or None. Returns [B, S, H, D].

    The [B, S, H, D] layout is the one every attention op of a block takes (`StaticBlock.attention_op`):
    it is FlashAttention's own layout, and the one a sequence-parallel all-to-all splits.
    """
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def find_fa3() -> tuple[str, object, tuple[torch.dtype, ...]] | None:
    """(module name, flash_attn_func, 16-bit dtypes with kernels) of the first FA3 build that imports, or None."""
    for name, dtypes in FA3_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # absent, or built for another torch/CUDA: either way not usable here
            continue
        func = getattr(module, "flash_attn_func", None)
        if func is not None:
            return name, func, dtypes
    return None


def fa3_unavailable_reason(device: torch.device) -> str | None:
    """Why FA3 cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FlashAttention-3 needs a CUDA GPU (device is {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FlashAttention-3 runs on Hopper (compute capability 9.x); this GPU is {major}.{minor}"
    if find_fa3() is None:
        return f"no FlashAttention-3 module imports ({', '.join(m for m, _ in FA3_MODULES)}); {FA3_INSTALL_HINT}"
    return None


def resolve_attention_backend(name: str | None, device, *, precision: str | None = None,
                              unavailable=fa3_unavailable_reason) -> str:
    """The backend that will run: 'auto'/None picks fa3 where it can run (fa3-fp8 for an engine of
    `precision` 'fp8'), else sdpa; an explicit fa3 or fa3-fp8 that cannot run here is an error saying
    why (no silent downgrade of what was asked)."""
    name = "auto" if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "sdpa":
        return name
    reason = unavailable(torch.device(device))
    if name == "auto":
        return "sdpa" if reason else "fa3-fp8" if precision == "fp8" else "fa3"
    if reason:
        raise RuntimeError(f"attention backend {name!r} cannot run: {reason}. Use attention_backend='sdpa' or 'auto'.")
    return name


def make_fa3(func, dtypes) -> callable:
    """The FA3 16-bit op; with a mask (unequal captions) it is SDPA for that call."""

    def fa3_attention(q, k, v, mask):
        if mask is not None:
            return sdpa_attention(q, k, v, mask)
        if q.dtype in dtypes:
            return _first(func(q, k, v))
        # fp16 model, bf16-only kernels: |out| <= max|v| (convex combination); bf16 rounding of v can
        # exceed fp16's largest value, hence the clamp before casting back.
        out = _first(func(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)))
        return out.float().clamp(-FP16_MAX, FP16_MAX).to(q.dtype)  # (in fp32: bf16 cannot hold 65504)

    return fa3_attention


def quantize_heads_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] -> (e4m3 [B, S, H, D], descale fp32 [B, H]): one scale per item and head."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12)  # [B, H]
    scale = amax / FP8_MAX
    quantised = (x.float() / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantised, scale


class Fa3E4m3Attention:
    """FA3 on e4m3 q, k, v; output in the input's 16-bit dtype. Called as an attention op (q, k, v, mask)
    it quantises q, k and v itself (one scale per item and head); a block whose fused kernel already
    made e4m3 q and k with static scales calls `fp8_qk` instead, and only v is quantised here."""

    takes_fp8_qk = True

    def __init__(self, func):
        self.func = func

    def __call__(self, q, k, v, mask):
        if mask is not None:
            return sdpa_attention(q, k, v, mask)
        q8, qs = quantize_heads_fp8(q)
        k8, ks = quantize_heads_fp8(k)
        v8, vs = quantize_heads_fp8(v)
        return self._finish(_first(self.func(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)), q.dtype)

    def fp8_qk(self, q8, q_scale: float, k8, k_scale: float, v, dtype):
        """q8, k8 [B, S, H, D] e4m3 with static scales (floats); v 16-bit, quantised per item here."""
        batch, heads = v.shape[0], v.shape[2]
        if fused_kernels.usable(v):
            v8, vs = fused_kernels.quantize_per_item_fp8(v)  # two bandwidth-bound passes, no Inductor reduction
        else:
            amax = v.reshape(batch, -1).abs().amax(dim=1).float().clamp(min=1e-12)  # [B]: a contiguous reduction
            vs = amax / FP8_MAX
            v8 = (v.float() / vs[:, None, None, None]).to(torch.float8_e4m3fn)
        ones = torch.ones(batch, heads, device=v.device, dtype=torch.float32)
        out = self.func(q8, k8, v8, q_descale=ones * q_scale, k_descale=ones * k_scale,
                        v_descale=(vs[:, None] * ones).contiguous())
        return self._finish(_first(out), dtype)

    @staticmethod
    def _finish(out, dtype):
        if dtype == torch.float16:
            out = out.float().clamp(-FP16_MAX, FP16_MAX)  # (in fp32: bf16 cannot hold 65504)
        return out.to(dtype)


def make_fa3_fp8(func) -> Fa3E4m3Attention:
    return Fa3E4m3Attention(func)


def _first(result):
    # Some FA3 builds return (out, softmax_lse); all return out first.
    return result[0] if isinstance(result, tuple) else result


def attention_op(backend: str):
    """The op for a resolved backend name ('sdpa', 'fa3' or 'fa3-fp8')."""
    if backend == "sdpa":
        return sdpa_attention
    found = find_fa3()
    if found is None:
        raise RuntimeError(f"attention backend {backend!r}: no FlashAttention-3 module imports; {FA3_INSTALL_HINT}")
    _, func, dtypes = found
    return make_fa3_fp8(func) if backend == "fa3-fp8" else make_fa3(func, dtypes)


def describe(backend: str, dtype: torch.dtype) -> str:
    """One line saying which attention kernel runs (logged when an engine opens)."""
    if backend == "sdpa":
        return "attention: SDPA (cuDNN first on CUDA)"
    module, _, dtypes = find_fa3()
    if backend == "fa3-fp8":
        return f"attention: FlashAttention-3 FP8 e4m3 ({module}), SDPA where a key mask is needed"
    inside = "" if dtype in dtypes or dtype == torch.float32 else f", in bf16 inside this {dtype} model"
    return f"attention: FlashAttention-3 ({module}{inside}), SDPA where a key mask is needed"
