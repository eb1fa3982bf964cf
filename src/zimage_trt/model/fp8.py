"""FP8 (e4m3) layers and the conversions that put them in place: the one module that defines them.

The denoiser's block projections and the text encoder's linear layers become `Fp8Linear`; attention,
norms, modulation and the embedders stay 16-bit. Used by the engines (the static denoiser's
`quantize_fp8`), the runtime (converting blocks on their way to the GPU) and the text encoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8Rows(NamedTuple):
    """Activations already quantised per token for an FP8 projection (`Fp8Linear.forward_quantised`)."""
    values: torch.Tensor  # [M, K] e4m3
    scales: torch.Tensor  # [M, 1] fp32
    lead_shape: tuple  # the shape of the 16-bit activations minus their last dimension


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [N, K], float32 scale [1, N]): one scale per output row, the row's max -> 448."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [N, 1]
    return (weight / scale).to(torch.float8_e4m3fn), scale.t().contiguous()  # [1, N], as _scaled_mm wants


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in float8 e4m3 (one scale per output row) and x quantised per token on the
    fly; products accumulate in fp32 and come out in bf16 (`torch._scaled_mm`, row-wise scales).

    Hopper and Ada run e4m3 products at about twice the bf16 rate (BENCHMARKS.md, "FP8").
    Attention, norms, modulation and the embedders stay in 16-bit.

    `input_quantizer`: None quantises the input with torch ops (four passes over it); a function
    rows [M, K] -> (e4m3 [M, K], scales [M, 1]) replaces them on CUDA (`fused_kernels.quantize_rows_fp8`,
    one pass; `set_input_quantizer` switches a whole model).
    """

    input_quantizer = None

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight_fp8, weight_scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise new 16-bit weights (e.g. with a LoRA merged in) into this layer's own buffers, scales
        recomputed, on the layer's device; in place, so compiled graphs holding the buffers see them."""
        if tuple(weight.shape) != tuple(self.weight_fp8.shape):
            raise ValueError(f"Fp8Linear.set_weight: weight of shape {tuple(weight.shape)}, the layer is "
                             f"{tuple(self.weight_fp8.shape)}")
        weight_fp8, weight_scale = quantize_rows(weight.to(self.weight_fp8.device))
        self.weight_fp8.copy_(weight_fp8)
        self.weight_scale.copy_(weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.input_quantizer is not None and rows.is_cuda:
            quantised, row_scale = self.input_quantizer(rows)
            return self.forward_quantised(quantised, row_scale, x.shape[:-1])
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
        quantised = (rows.float() / row_scale).to(torch.float8_e4m3fn)
        return self.forward_quantised(quantised, row_scale, x.shape[:-1])

    def forward_quantised(self, quantised: torch.Tensor, row_scale: torch.Tensor, lead_shape) -> torch.Tensor:
        """The product for an input already quantised per token (e.g. by a fused kernel that made it):
        quantised [M, K] e4m3, row_scale [M, 1] fp32; the output takes the shape lead_shape + [N]."""
        # Fast accumulation (fewer partial-sum bits kept between promotions): faster, and no less exact
        # than the slow path on Z-Image's shapes (bench/fp8_gemm.py; figures in BENCHMARKS.md).
        # The bias is added after the product, not in cuBLASLt's epilogue: with a bias its heuristic refuses
        # some row-wise scaled shapes (CUBLAS_STATUS_NOT_SUPPORTED; bench/scaled_mm_shapes.py lists them),
        # without one it has run every shape tried. (Z-Image's projections and its text encoder's have none.)
        out = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=row_scale, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype, use_fast_accum=True)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead_shape, self.out_features)


def set_input_quantizer(module: nn.Module, quantizer) -> int:
    """Every `Fp8Linear` of `module` quantises its input with `quantizer` (None: torch ops); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.input_quantizer = quantizer
    return len(layers)


def block_projections(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of a ZImageTransformerBlock's seven big projections, the ones FP8 replaces."""
    attn, ff = block.attention, block.feed_forward
    return [(attn, "to_q"), (attn, "to_k"), (attn, "to_v"), (attn.to_out, "0"), (ff, "w1"), (ff, "w2"), (ff, "w3")]


def quantize_block_fp8(block: nn.Module) -> None:
    """Swap a ZImageTransformerBlock's big projections for Fp8Linear, in place (frees the 16-bit copies)."""
    for owner, name in block_projections(block):
        if isinstance(getattr(owner, name), nn.Linear):
            setattr(owner, name, Fp8Linear(getattr(owner, name)))


def is_fp8_block(block: nn.Module) -> bool:
    return any(isinstance(getattr(owner, name), Fp8Linear) for owner, name in block_projections(block))


def quantize_text_encoder_fp8(text_encoder: nn.Module) -> int:
    """Swap every linear layer of the text encoder for an FP8 one (e4m3 weights, one scale per output
    row; activations quantised per token), in place; embeddings, norms and attention stay bf16.

    For Qwen3-4B that is 3.6 of its 4.0 B parameters, about half its GPU memory (BENCHMARKS.md). The features move by about what the denoiser's FP8 moves its output (tested
    on the tiny model). Returns how many layers were swapped.
    """
    dtypes = {p.dtype for p in text_encoder.parameters() if p.is_floating_point()}
    if dtypes != {torch.bfloat16}:
        raise ValueError(f"an FP8 text encoder keeps its other parts in bfloat16; this one is {sorted(map(str, dtypes))}: "
                         "load it with torch_dtype=torch.bfloat16")
    # (parent, name) only: holding the old layers themselves would keep every 16-bit weight alive until
    # the end, doubling the peak memory of the conversion.
    swaps = [(parent, name) for parent in text_encoder.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name in swaps:
        setattr(parent, name, Fp8Linear(getattr(parent, name)))
    return len(swaps)
