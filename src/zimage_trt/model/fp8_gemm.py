"""Our own FP8 GEMM (Triton, persistent, TMA loads) for the feed-forward's w1|w3 product, with the
SiLU gate and the row amax in its epilogue: the "FP8 epilogues" switch, off by default until measured.

Why: in an FP8 block the w1 and w3 products are two cuBLAS calls writing g and u (16-bit), then a
kernel reads both back to make silu(g) * u and quantise it per token for w2 (BENCHMARKS.md, "Speed
II, second pass": 3.0 ms a step). torch exposes no cuBLASLt epilogue for FP8 products
(`torch._scaled_mm` and `torch.nn.functional.scaled_mm` in torch 2.11 take scales and a bias only,
and cuBLASLt's own FP8 amax epilogue is one amax of the whole output, not one per row), so this
GEMM computes both products from the same loads of x, and its epilogue writes h = silu(g) * u once
(16-bit) and folds each tile's row maxima into a per-row amax (atomic max). A short second pass
quantises h per row with that amax (a row's amax needs every column tile, which no single tile sees).
Roundings follow the unfused path: g and u rounded to 16 bits as `_scaled_mm`'s bf16 output is, the
gate rounded as F.silu's, the product rounded, then e4m3 of h / (amax / 448) saturating.

The attention output's quantisation for its projection is the other half of the switch: FA3 writes
that output and its epilogue is not ours (a binary wheel), so there `fused_kernels.quantize_rows_fp8`
(one pass per row) replaces the torch ops. Kernels are torch custom ops for the reason
model/fused_kernels.py gives. CUDA with Triton only (`AVAILABLE`); callers keep the unfused path otherwise.
"""

from __future__ import annotations

import torch

from .switches import option_or_env

try:  # optional heavy dependency: the kernels exist only where Triton does
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only install, or a Triton without host-side tensor descriptors (< 3.4)
    triton = None

AVAILABLE = triton is not None
# Switched on (1/on/true/yes: model/switches.py) turns the epilogue GEMM on in every denoiser whose
# `set_fused_kernels` leaves fp8_epilogues None.
FP8_EPILOGUES_ENV = "ZIMAGE_TRT_FP8_EPILOGUES"


def epilogues_wanted(flag: bool | None) -> bool:
    return option_or_env("fp8_epilogues", flag, FP8_EPILOGUES_ENV, default=False)


if triton is not None:

    @triton.jit
    def _tile_position(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # Grouped order: GROUP_M row tiles share each column tile's weights while they are in L2.
        per_group = GROUP_M * num_pid_n
        group = tile // per_group
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows_in_group
        pid_n = (tile % per_group) // rows_in_group
        return pid_m, pid_n

    @triton.jit
    def _swiglu_fp8_kernel(a_desc, w1_desc, w3_desc, a_scale_ptr, w1_scale_ptr, w3_scale_ptr, h_ptr, amax_ptr,
                           M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
            pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kt in range(k_tiles):
                off_k = kt * BLOCK_K
                a = a_desc.load([off_m, off_k])  # (TMA; tiles past the edges read as zeros)
                acc_g = tl.dot(a, w1_desc.load([off_n, off_k]).T, acc_g)
                acc_u = tl.dot(a, w3_desc.load([off_n, off_k]).T, acc_u)
            rows = off_m + tl.arange(0, BLOCK_M)
            cols = off_n + tl.arange(0, BLOCK_N)
            row_live = rows < M
            col_live = cols < N
            a_s = tl.load(a_scale_ptr + rows, mask=row_live, other=0.0)
            half = h_ptr.dtype.element_ty
            g = (acc_g * a_s[:, None] * tl.load(w1_scale_ptr + cols, mask=col_live, other=0.0)[None, :]).to(half)
            u = (acc_u * a_s[:, None] * tl.load(w3_scale_ptr + cols, mask=col_live, other=0.0)[None, :]).to(half)
            gf = g.to(tl.float32)
            gate = (gf / (1.0 + tl.exp(-gf))).to(half)  # F.silu, rounded to 16 bits
            h = (gate.to(tl.float32) * u.to(tl.float32)).to(half)  # gate * up, a 16-bit product
            live = row_live[:, None] & col_live[None, :]
            tl.store(h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], h, mask=live)
            tile_amax = tl.max(tl.where(live, tl.abs(h.to(tl.float32)), 0.0), axis=1)
            tl.atomic_max(amax_ptr + rows, tile_amax, mask=row_live)

    @triton.jit
    def _quantize_with_amax_kernel(h_ptr, amax_ptr, q_ptr, scale_ptr, M, N, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = (rows < M)[:, None] & (cols < N)[None, :]
        scale = tl.maximum(tl.load(amax_ptr + rows, mask=rows < M, other=1.0), 1e-12) / 448.0
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(h_ptr + offsets, mask=live, other=0.0).to(tl.float32)
        tl.store(q_ptr + offsets, tl.clamp(h / scale[:, None], -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=live)
        if tl.program_id(1) == 0:
            tl.store(scale_ptr + rows, scale, mask=rows < M)


# Tile for Z-Image's w1|w3 product (M ~4k tokens, N 10240, K 3840): 128 rows x 64 columns of g and of u
# (a 128 x 128 tile of the joint w1|w3 output), K in steps of 128 e4m3 values, 8 warps, 4 stages: the
# widest tile that compiles for sm_90a without register spills (the next one, 128 x 128 columns each,
# spills, so it is the one bench/speed2_probe.py times beside it; figures in BENCHMARKS.md, FP8 epilogue GEMM).
# A dict, so a probe can try another tile: read each time the op launches its kernel, so a change reaches
# later launches but not a CUDA graph captured before it, which replays the kernel it captured.
TILE = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def _programs(device: torch.device, tiles: int) -> int:
    if device.type != "cuda":  # (Triton's interpreter, in tests)
        return min(tiles, 4)
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


@torch.library.custom_op("zimage_trt::swiglu_fp8_amax", mutates_args=())
def _swiglu_fp8_op(x8: torch.Tensor, x_scale: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor,
                   w3: torch.Tensor, w3_scale: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x8.shape
    n = w1.shape[0]
    h = torch.empty((m, n), device=x8.device, dtype=out_dtype)
    amax = torch.zeros((m,), device=x8.device, dtype=torch.float32)
    t = dict(TILE)
    tiles = triton.cdiv(m, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"])
    programs = _programs(x8.device, tiles)
    a_desc = TensorDescriptor.from_tensor(x8.contiguous(), [t["BLOCK_M"], t["BLOCK_K"]])
    w1_desc = TensorDescriptor.from_tensor(w1, [t["BLOCK_N"], t["BLOCK_K"]])
    w3_desc = TensorDescriptor.from_tensor(w3, [t["BLOCK_N"], t["BLOCK_K"]])
    _swiglu_fp8_kernel[(programs,)](a_desc, w1_desc, w3_desc, x_scale.reshape(-1).contiguous(),
                                    w1_scale.reshape(-1).contiguous(), w3_scale.reshape(-1).contiguous(), h, amax,
                                    m, n, k, NUM_PROGRAMS=programs, **t)
    return h, amax


@_swiglu_fp8_op.register_fake
def _(x8, x_scale, w1, w1_scale, w3, w3_scale, out_dtype):
    m, n = x8.shape[0], w1.shape[0]
    return x8.new_empty((m, n), dtype=out_dtype), x8.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("zimage_trt::quantize_with_amax_fp8", mutates_args=())
def _quantize_with_amax_op(h: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = h.shape
    q = torch.empty((m, n), device=h.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=h.device, dtype=torch.float32)
    block_m, block_n = 8, 1024
    _quantize_with_amax_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        h, amax, q, scale, m, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8)
    return q, scale


@_quantize_with_amax_op.register_fake
def _(h, amax):
    return h.new_empty(h.shape, dtype=torch.float8_e4m3fn), h.new_empty((h.shape[0], 1), dtype=torch.float32)


def swiglu_fp8(x8: torch.Tensor, x_scale: torch.Tensor, w1, w3) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(x W1^T) * (x W3^T) quantised per row to e4m3, for the w2 product: x8 [M, K] e4m3 with
    x_scale [M, 1]; w1, w3 the two `Fp8Linear` layers (no bias, as Z-Image's). Returns
    (e4m3 [M, N], scales [M, 1] fp32), what `fused_kernels.silu_mul_quant_fp8` makes from the two
    cuBLAS products."""
    if w1.bias is not None or w3.bias is not None:
        raise ValueError("swiglu_fp8: the fused w1|w3 product takes projections without a bias")
    h, amax = _swiglu_fp8_op(x8, x_scale, w1.weight_fp8, w1.weight_scale, w3.weight_fp8, w3.weight_scale, w1.out_dtype)
    return _quantize_with_amax_op(h, amax)


def usable(x8: torch.Tensor) -> bool:
    """The kernel runs here: CUDA, Triton with tensor descriptors, TMA's 16-byte row alignment."""
    return AVAILABLE and x8.is_cuda and x8.shape[-1] % 16 == 0
