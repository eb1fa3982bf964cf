"""Hand-written Triton kernels for element-wise chains that Inductor leaves slow (CUDA only).

Profiled on the H100 and H200 (BENCHMARKS.md, "Speed II"): Inductor's fused q/k RMSNorm + RoPE ran at
about a third of memory bandwidth (the interleaved RoPE pairs defeat its vectorised loads), the FP8
engine's SiLU gate + per-token quantisation at about half, and its gate + residual + RMSNorm +
modulation (+ quantisation) chain at about a third (it re-reads the row once per reduction). Each kernel
here computes the same maths as the unfused torch code, rounding to 16 bits where that code rounds, so
the results agree bar the order of fp32 sums (gpu-marked parity tests in tests/test_fused_kernels.py).

Each kernel is a torch custom op (`zimage_trt::...`): torch.compile calls it as one opaque op instead of
compiling the Triton source itself, which failed inside Inductor's compile workers for kernels with e4m3
outputs (H200, torch 2.11). Triton is optional (absent on CPU-only installs): `AVAILABLE` says whether
these kernels exist; callers fall back to the torch maths when it is False or tensors are not on CUDA.
"""

from __future__ import annotations

import torch

from .fp8 import Fp8Rows

try:  # optional heavy dependency: the kernels exist only where Triton does
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

AVAILABLE = triton is not None
FP8_E4M3_MAX = 448.0


def usable(*tensors: torch.Tensor) -> bool:
    return AVAILABLE and all(t.is_cuda for t in tensors)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, heads, eps, inv_scale,
                             D: tl.constexpr, BLOCK_R: tl.constexpr, FP8_OUT: tl.constexpr):
        # rows = B*S*H head vectors of D values; row r belongs to token r // heads (cos/sin row).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        d = tl.arange(0, D)
        x_raw = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        half = x_raw.dtype
        x = x_raw.to(tl.float32)
        rs = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d).to(tl.float32)
        # rms_norm: (x * rsqrt) rounded to the weight's dtype, times the weight, rounded again
        y = ((x * rs[:, None]).to(half).to(tl.float32) * w[None, :]).to(half).to(tl.float32)
        token = r // heads
        p = tl.arange(0, D // 2)
        c = tl.load(cos_ptr + token[:, None] * (D // 2) + p[None, :], mask=live[:, None], other=0.0)
        s = tl.load(sin_ptr + token[:, None] * (D // 2) + p[None, :], mask=live[:, None], other=0.0)
        even, odd = tl.split(tl.reshape(y, (BLOCK_R, D // 2, 2)))
        out = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK_R, D))
        out = out.to(half)  # apply_rope's output dtype
        if FP8_OUT:  # quantize_static_fp8 of that 16-bit result
            out = tl.clamp(out.to(tl.float32) * inv_scale, -448.0, 448.0)
        tl.store(out_ptr + r[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _silu_mul_quant_kernel(a_ptr, b_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        live = col < n
        a = tl.load(a_ptr + row * n + col, mask=live, other=0.0)
        half = a.dtype
        af = a.to(tl.float32)
        gate = (af / (1.0 + tl.exp(-af))).to(half)  # F.silu, rounded to the 16-bit dtype
        b = tl.load(b_ptr + row * n + col, mask=live, other=0.0)
        prod = (gate * b).to(tl.float32)  # gate * up, a 16-bit product
        amax = tl.max(tl.where(live, tl.abs(prod), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        # (the clamp only catches 448 * (1 + 1 ulp) from the division; GPUs convert saturating anyway)
        tl.store(q_ptr + row * n + col, tl.clamp(prod / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=live)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _rms_norm_row(v, w, eps, n, half):
        # denoiser.rms_norm on one row held in fp32: fp32 statistics, rounded to 16 bits, times the
        # 16-bit weight, rounded again
        rs = tl.rsqrt(tl.sum(v * v, axis=0) / n + eps)
        return ((v * rs).to(half).to(tl.float32) * w).to(half).to(tl.float32)

    @triton.jit
    def _residual_norm_kernel(x_ptr, y_ptr, w_post_ptr, gate_ptr, w_next_ptr, mod_ptr,
                              x_out_ptr, h_ptr, h_scale_ptr, n, rows_per_item, eps_post, eps_next,
                              HAS_Y: tl.constexpr, HAS_H: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
        # One token (row of n features) a program. With y: x' = x + gate * rms_norm(y; w_post), written
        # out; with HAS_H: h = rms_norm(x'; w_next) * mod, written 16-bit or (QUANT) as e4m3 + row scale.
        row = tl.program_id(0)
        item = row // rows_per_item
        col = tl.arange(0, BLOCK)
        live = col < n
        x_raw = tl.load(x_ptr + row * n + col, mask=live, other=0.0)
        half = x_raw.dtype
        x = x_raw.to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + row * n + col, mask=live, other=0.0).to(tl.float32)
            w_post = tl.load(w_post_ptr + col, mask=live, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + item * n + col, mask=live, other=0.0).to(tl.float32)
            normed = _rms_norm_row(y, w_post, eps_post, n, half)
            x = (x + (gate * normed).to(half).to(tl.float32)).to(half).to(tl.float32)
            tl.store(x_out_ptr + row * n + col, x.to(half), mask=live)
        if HAS_H:
            w_next = tl.load(w_next_ptr + col, mask=live, other=0.0).to(tl.float32)
            mod = tl.load(mod_ptr + item * n + col, mask=live, other=0.0).to(tl.float32)
            h = (_rms_norm_row(x, w_next, eps_next, n, half) * mod).to(half).to(tl.float32)
            if QUANT:  # Fp8Linear.forward's per-token quantisation of that 16-bit h
                amax = tl.max(tl.where(live, tl.abs(h), 0.0), axis=0)
                scale = tl.maximum(amax, 1e-12) / 448.0
                tl.store(h_ptr + row * n + col, tl.clamp(h / scale, -448.0, 448.0).to(h_ptr.dtype.element_ty), mask=live)
                tl.store(h_scale_ptr + row, scale)
            else:
                tl.store(h_ptr + row * n + col, h.to(half), mask=live)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        # One row a program: its amax, then the row / (amax / 448) in e4m3, one read of the row.
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        live = col < n
        x = tl.load(x_ptr + row.to(tl.int64) * n + col, mask=live, other=0.0).to(tl.float32)
        amax = tl.max(tl.where(live, tl.abs(x), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(q_ptr + row.to(tl.int64) * n + col, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty),
                 mask=live)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _amax_per_item_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr):
        item = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + item * n + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.atomic_max(amax_ptr + item, tl.max(tl.abs(x), axis=0))

    @triton.jit
    def _quantize_per_item_kernel(x_ptr, amax_ptr, q_ptr, n, BLOCK: tl.constexpr):
        item = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        scale = tl.maximum(tl.load(amax_ptr + item), 1e-12) / 448.0
        x = tl.load(x_ptr + item * n + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(q_ptr + item * n + offs, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty),
                 mask=offs < n)


def _row_block(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


# -- q/k RMSNorm + RoPE (+ static e4m3) ------------------------------------------------------------
@torch.library.custom_op("zimage_trt::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                     fp8_scale: float) -> torch.Tensor:
    B, S, H, D = x.shape
    x = x.contiguous()
    cos = cos.expand(B, S, 1, D // 2).reshape(B * S, D // 2).contiguous()
    sin = sin.expand(B, S, 1, D // 2).reshape(B * S, D // 2).contiguous()
    fp8 = fp8_scale > 0
    out = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn if fp8 else x.dtype)
    rows = B * S * H
    block_r = 16
    _qk_norm_rope_kernel[(triton.cdiv(rows, block_r),)](x, weight, cos, sin, out, rows, H, eps,
                                                        1.0 / fp8_scale if fp8 else 1.0, D=D, BLOCK_R=block_r,
                                                        FP8_OUT=fp8, num_warps=4)
    return out


@_qk_norm_rope_op.register_fake
def _(x, weight, eps, cos, sin, fp8_scale):
    return torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn if fp8_scale > 0 else x.dtype)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 fp8_scale: float | None = None) -> torch.Tensor:
    """RMSNorm over the head dim (weight [D]) then interleaved RoPE, one pass. x [B, S, H, D];
    cos, sin [B, S, 1, D/2] fp32. Same dtype out, or with `fp8_scale` e4m3 values of out / fp8_scale
    (saturating), as `quantize_static_fp8` of the 16-bit result gives."""
    return _qk_norm_rope_op(x, weight, float(eps), cos, sin, float(fp8_scale or 0.0))


def quantize_static_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in e4m3 (saturating), in torch: the reference `qk_norm_rope(..., fp8_scale)` matches."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


# -- SiLU gate + per-token e4m3 ---------------------------------------------------------------------
@torch.library.custom_op("zimage_trt::silu_mul_quant_fp8", mutates_args=())
def _silu_mul_quant_op(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.shape[-1]
    a2, b2 = a.reshape(-1, n).contiguous(), b.reshape(-1, n).contiguous()
    m = a2.shape[0]
    q = torch.empty((m, n), device=a.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=a.device, dtype=torch.float32)
    block, warps = _row_block(n)
    _silu_mul_quant_kernel[(m,)](a2, b2, q, scale, n, BLOCK=block, num_warps=warps)
    return q, scale


@_silu_mul_quant_op.register_fake
def _(a, b):
    n = a.shape[-1]
    m = a.numel() // n
    return a.new_empty((m, n), dtype=torch.float8_e4m3fn), a.new_empty((m, 1), dtype=torch.float32)


def silu_mul_quant_fp8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(a) * b) quantised per row to e4m3: (values [M, N] e4m3, scales [M, 1] fp32), as Fp8Linear does."""
    return _silu_mul_quant_op(a, b)


# -- gate + residual + RMSNorm + modulation (+ per-token e4m3) ------------------------------------------
@torch.library.custom_op("zimage_trt::residual_norm", mutates_args=())
def _residual_norm_op(x: torch.Tensor, y: torch.Tensor | None, w_post: torch.Tensor | None, eps_post: float,
                      gate: torch.Tensor | None, w_next: torch.Tensor | None, eps_next: float,
                      mod: torch.Tensor | None, quant: bool) -> list[torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    m = x2.shape[0]
    rows_per_item = m // (gate if gate is not None else mod).shape[0]
    has_y, has_h = y is not None, w_next is not None
    x_out = torch.empty_like(x2) if has_y else x2
    h = torch.empty((m, n), device=x.device, dtype=torch.float8_e4m3fn if quant else x.dtype) if has_h else x2
    h_scale = torch.empty((m, 1), device=x.device, dtype=torch.float32) if quant else x2
    y2 = y.reshape(-1, n).contiguous() if has_y else x2
    block, warps = _row_block(n)
    _residual_norm_kernel[(m,)](x2, y2, w_post if has_y else x2, gate.contiguous() if has_y else x2,
                                w_next if has_h else x2, mod.contiguous() if has_h else x2,
                                x_out, h, h_scale, n, rows_per_item, eps_post, eps_next,
                                HAS_Y=has_y, HAS_H=has_h, QUANT=quant, BLOCK=block, num_warps=warps)
    outs = [x_out.view(x.shape)] if has_y else []
    if has_h:
        outs += [h, h_scale] if quant else [h.view(x.shape)]
    return outs


@_residual_norm_op.register_fake
def _(x, y, w_post, eps_post, gate, w_next, eps_next, mod, quant):
    n = x.shape[-1]
    m = x.numel() // n
    outs = [torch.empty_like(x)] if y is not None else []
    if w_next is not None:
        outs += ([x.new_empty((m, n), dtype=torch.float8_e4m3fn), x.new_empty((m, 1), dtype=torch.float32)]
                 if quant else [torch.empty_like(x)])
    return outs


def residual_norm(x, y=None, w_post=None, eps_post=0.0, gate=None, w_next=None, eps_next=0.0, mod=None,
                  quant=False):
    """A Z-Image block's element-wise chain between projections, one pass over each token's row:

        x' = x + gate * rms_norm(y; w_post, eps_post)        (when y is given; else x' = x)
        h  = rms_norm(x'; w_next, eps_next) * mod            (when w_next is given)

    x, y [B, S, N] 16-bit; weights [N]; gate, mod [B, N] (one row per item). Returns x' (with y), then h
    (with w_next): 16-bit [B, S, N], or with `quant` an `Fp8Rows` made as `Fp8Linear` quantises its input.
    """
    outs = _residual_norm_op(x, y, w_post, float(eps_post), gate, w_next, float(eps_next), mod, bool(quant))
    result = []
    if y is not None:
        result.append(outs[0])
    if w_next is not None:
        result.append(Fp8Rows(outs[-2], outs[-1], tuple(x.shape[:-1])) if quant else outs[-1])
    return result[0] if len(result) == 1 else tuple(result)


# -- e4m3 with one scale per batch item (FA3's v) ----------------------------------------------------------
@torch.library.custom_op("zimage_trt::quantize_per_item_fp8", mutates_args=())
def _quantize_per_item_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = x.shape[0]
    x2 = x.reshape(batch, -1).contiguous()
    n = x2.shape[1]
    amax = torch.zeros(batch, device=x.device, dtype=torch.float32)
    block = 8192
    grid = (batch, triton.cdiv(n, block))
    _amax_per_item_kernel[grid](x2, amax, n, BLOCK=block, num_warps=8)
    q = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    _quantize_per_item_kernel[grid](x2, amax, q, n, BLOCK=block, num_warps=8)
    return q, amax.clamp(min=1e-12) / FP8_E4M3_MAX


@_quantize_per_item_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0],), dtype=torch.float32)


def quantize_per_item_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x / scale, scale [B] fp32) with one scale per batch item, its amax -> 448; two passes
    (an amax with atomics, then the quantisation)."""
    return _quantize_per_item_op(x)


# -- per-token e4m3 (an FP8 projection's input) ------------------------------------------------------------
@torch.library.custom_op("zimage_trt::quantize_rows_fp8", mutates_args=())
def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    m = x2.shape[0]
    q = torch.empty((m, n), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        block, warps = _row_block(n)
        _quantize_rows_kernel[(m,)](x2, q, scale, n, BLOCK=block, num_warps=warps)
    return q, scale


@_quantize_rows_op.register_fake
def _(x):
    n = x.shape[-1]
    m = x.numel() // n
    return x.new_empty((m, n), dtype=torch.float8_e4m3fn), x.new_empty((m, 1), dtype=torch.float32)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] 16-bit -> (e4m3 [M, K], scale [M, 1] fp32) with one scale per row (token), its amax
    -> 448: `Fp8Linear.forward`'s quantisation (abs, amax, divide, convert: four passes in eager torch)
    as one kernel that reads each row once."""
    return _quantize_rows_op(x)
