"""`StaticZImageDenoiser`: diffusers' Z-Image transformer, re-expressed for fixed shapes.

diffusers' `ZImageTransformer2DModel.forward` takes Python lists, pads each caption and image on the
fly, builds complex RoPE with `view_as_complex`, and concatenates per item. None of that exports or
compiles into a fixed-shape engine. This module computes the same function (basic, non-omni mode)
from plain tensors and shares the diffusers module's weights (no copy):

    latents     [B, 16, h, w]   the latent image (any float dtype)
    timestep    [B]             diffusers' model timestep, (1000 - t) / 1000, in [0, 1]
    cap_feats   [B, C, F]       text-encoder features, each item's L real rows first, then anything
    cap_lens    [B]  int64      L per item, 1 <= L <= C
    ->          [B, 16, h, w]   float32 model output (the pipeline negates it for the Euler step)

How the diffusers layout is reproduced (see `transformer_z_image.py`):
- a caption of L tokens is padded to P = ceil(L / 32) * 32 rows with the learned `cap_pad_token`;
  caption row i sits at RoPE position (1 + i, 0, 0);
- the image is patchified 2x2, padded to a multiple of 32 tokens with `x_pad_token` (pad rows at
  position (0, 0, 0)); real image tokens sit at (P + 1, row, col), so image RoPE depends on P;
- the joint sequence is [image tokens, caption rows]; caption rows at or past P (engine capacity
  beyond this item's padded caption) are masked out as attention keys, as diffusers masks batch padding.

FP16 safety: Z-Image's attention and feed-forward outputs can exceed fp16's 65504. Both are followed
by an RMSNorm, and RMSNorm(s*y; eps*s^2) == RMSNorm(y; eps) for any s > 0. With s = 2^-k the scaling
is exact in binary floating point (bar subnormals), so `downscale_log2` shrinks those outputs by a
per-block power of two and the next norm undoes it. The build picks k from measured activation
magnitudes (`model/fp16_range.py`, `compiler/fp16_calibration.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attention_backends
from .attention import sdpa_attention
from . import fp8_gemm, fused_kernels
from .fp8 import Fp8Linear, Fp8Rows, quantize_block_fp8
from .shapes import PATCH_SIZE, SEQ_MULTI_OF



def rms_norm(norm: nn.Module, x: torch.Tensor, eps_scale: float = 1.0) -> torch.Tensor:
    """diffusers' `RMSNorm.forward` (fp32 statistics, output in the weight's half dtype)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    out = x * torch.rsqrt(variance + norm.eps * eps_scale)
    weight = norm.weight
    if weight is None:
        return out.to(x.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        out = out.to(weight.dtype)
    return out * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given, in fp32.

    x: [B, S, H, D]; cos, sin: [B, S, 1, D/2]. Real-valued equivalent of diffusers' complex product.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def project(linear: nn.Module, x) -> torch.Tensor:
    """linear(x), where x may be an `Fp8Rows` (already quantised for an `Fp8Linear`, by a fused kernel)."""
    if isinstance(x, Fp8Rows):
        return linear.forward_quantised(x.values, x.scales, x.lead_shape)
    return linear(x)


class StaticBlock(nn.Module):
    """One `ZImageTransformerBlock`, same weights, tensor-only forward with optional fp16 downscaling."""

    def __init__(self, block: nn.Module, attn_log2: int = 0, ffn_log2: int = 0):
        super().__init__()
        self.block = block
        # The attention maths between the RoPE'd q, k, v and the output projection; swapped by the
        # attention-backend switch and wrapped by sequence parallelism, both without touching the block.
        self.attention_op = sdpa_attention
        self.set_downscale(attn_log2, ffn_log2)
        self.set_fused_kernels(False)

    def set_downscale(self, attn_log2: int, ffn_log2: int) -> None:
        self.attn_log2, self.ffn_log2 = int(attn_log2), int(ffn_log2)
        self.attn_scale = 2.0 ** -self.attn_log2
        self.ffn_scale = 2.0 ** -self.ffn_log2

    def set_fused_kernels(self, on: bool, residual_norms: bool = True, fp8_epilogues: bool | None = None) -> None:
        """Hand-written Triton kernels (model/fused_kernels.py) for q/k RMSNorm + RoPE, the gate +
        residual + RMSNorm + modulation chains (`residual_norms`; with the per-token quantisation in FP8
        blocks) and, in FP8 blocks, SiLU gate + quantisation; used only on CUDA tensors with Triton.
        `fp8_epilogues` (FP8 blocks, with `on`; None: $ZIMAGE_TRT_FP8_EPILOGUES, off by default): the
        w1|w3 product as our own FP8 GEMM with SiLU gate and row amax in its epilogue, and the
        attention output quantised in one pass (model/fp8_gemm.py)."""
        self.fused = bool(on)
        self.fp8_epilogues = self.fused and fp8_gemm.epilogues_wanted(fp8_epilogues)
        attn = self.block.attention
        # The residual/norm kernel needs every norm of the block to have a 16-bit weight (Z-Image's do).
        norms = (self.block.attention_norm1, self.block.attention_norm2, self.block.ffn_norm1, self.block.ffn_norm2)
        self.fusable_norms = residual_norms and all(
            n.weight is not None and n.weight.dtype in (torch.float16, torch.bfloat16) for n in norms)
        # Static FP8 scales for q and k: after RMSNorm a head vector has norm sqrt(D) times at most
        # max|weight|, and RoPE rotates pairs (norm-preserving), so no element exceeds that bound (1%
        # margin for the 16-bit roundings). No amax pass is needed; e4m3 is floating point, so a loose
        # bound costs range at the small end only (elements under ~1e-5 of the bound).
        self.q_fp8_scale = self.k_fp8_scale = None
        if self.fused and attn.norm_q is not None and attn.norm_k is not None and attn.norm_q.weight is not None:
            head_dim = attn.norm_q.weight.shape[0]
            for name, norm in (("q_fp8_scale", attn.norm_q), ("k_fp8_scale", attn.norm_k)):
                bound = math.sqrt(head_dim) * float(norm.weight.detach().abs().max()) * 1.01
                setattr(self, name, max(bound, 1e-6) / attention_backends.FP8_MAX)

    def attention(self, x, cos, sin, mask):
        """x: the normed, modulated tokens [B, S, N], or an `Fp8Rows` of them (fused FP8 blocks)."""
        attn = self.block.attention
        q = project(attn.to_q, x).unflatten(-1, (attn.heads, -1))
        k = project(attn.to_k, x).unflatten(-1, (attn.heads, -1))
        v = project(attn.to_v, x).unflatten(-1, (attn.heads, -1))
        op = self.attention_op
        if self.fused and self.q_fp8_scale is not None and fused_kernels.usable(q):
            if mask is None and getattr(op, "takes_fp8_qk", False):
                q8 = fused_kernels.qk_norm_rope(q, attn.norm_q.weight, attn.norm_q.eps, cos, sin, self.q_fp8_scale)
                k8 = fused_kernels.qk_norm_rope(k, attn.norm_k.weight, attn.norm_k.eps, cos, sin, self.k_fp8_scale)
                out = op.fp8_qk(q8, self.q_fp8_scale, k8, self.k_fp8_scale, v, v.dtype)
            else:
                q = fused_kernels.qk_norm_rope(q, attn.norm_q.weight, attn.norm_q.eps, cos, sin)
                k = fused_kernels.qk_norm_rope(k, attn.norm_k.weight, attn.norm_k.eps, cos, sin)
                out = op(q, k, v, mask)
        else:
            if attn.norm_q is not None:
                q = rms_norm(attn.norm_q, q)
            if attn.norm_k is not None:
                k = rms_norm(attn.norm_k, k)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            out = op(q, k, v, mask)
        out = out.flatten(2).to(v.dtype)
        if self.attn_log2:
            out = out * self.attn_scale  # exact power-of-two shrink; attention_norm2 undoes it
        if self.fp8_epilogues and isinstance(attn.to_out[0], Fp8Linear) and fused_kernels.usable(out):
            quantised, row_scale = fused_kernels.quantize_rows_fp8(out)
            return attn.to_out[0].forward_quantised(quantised, row_scale, out.shape[:-1])
        return attn.to_out[0](out)

    def feed_forward(self, x):
        """x: the normed, modulated tokens [B, S, N], or an `Fp8Rows` of them (fused FP8 blocks)."""
        ff = self.block.feed_forward
        rows = x if isinstance(x, Fp8Rows) else None
        tokens = rows.values if rows else x
        if self.fused and not self.ffn_log2 and isinstance(ff.w2, Fp8Linear) and fused_kernels.usable(tokens):
            lead_shape = rows.lead_shape if rows else x.shape[:-1]
            if self.fp8_epilogues and isinstance(ff.w1, Fp8Linear) and isinstance(ff.w3, Fp8Linear) and fp8_gemm.usable(tokens):
                x8, x_scale = (rows.values, rows.scales) if rows else fused_kernels.quantize_rows_fp8(x)
                quantised, row_scale = fp8_gemm.swiglu_fp8(x8, x_scale, ff.w1, ff.w3)
            else:
                quantised, row_scale = fused_kernels.silu_mul_quant_fp8(project(ff.w1, x), project(ff.w3, x))
            return ff.w2.forward_quantised(quantised, row_scale, lead_shape)
        gate = F.silu(project(ff.w1, x))
        up = ff.w3(x * self.ffn_scale) if self.ffn_log2 else project(ff.w3, x)
        return ff.w2(gate * up)

    def modulation(self, adaln):
        """(scale_msa, gate_msa, scale_mlp, gate_mlp), each [B, N]: 1 + scale, tanh(gate), as diffusers."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.block.adaLN_modulation(adaln).chunk(4, dim=1)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def fused_forward(self, x, cos, sin, mask, adaln):
        """`forward` of a modulated block with its element-wise chains in three fused kernels (CUDA)."""
        b = self.block
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(adaln)
        attn_in = fused_kernels.residual_norm(x, w_next=b.attention_norm1.weight, eps_next=b.attention_norm1.eps,
                                              mod=scale_msa, quant=isinstance(b.attention.to_q, Fp8Linear))
        attn_out = self.attention(attn_in, cos, sin, mask)
        x, ffn_in = fused_kernels.residual_norm(
            x, attn_out, b.attention_norm2.weight, b.attention_norm2.eps * self.attn_scale**2, gate_msa,
            b.ffn_norm1.weight, b.ffn_norm1.eps, scale_mlp,
            quant=isinstance(b.feed_forward.w1, Fp8Linear) and not self.ffn_log2)
        ffn_out = self.feed_forward(ffn_in)
        return fused_kernels.residual_norm(x, ffn_out, b.ffn_norm2.weight, b.ffn_norm2.eps * self.ffn_scale**2, gate_mlp)

    def forward(self, x, cos, sin, mask=None, adaln=None):
        b = self.block
        if self.fused and b.modulation and fused_kernels.usable(x) and self.fusable_norms:
            return self.fused_forward(x, cos, sin, mask, adaln)
        attn_eps, ffn_eps = self.attn_scale**2, self.ffn_scale**2
        if b.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = (m.unsqueeze(1) for m in self.modulation(adaln))
            attn_out = self.attention(rms_norm(b.attention_norm1, x) * scale_msa, cos, sin, mask)
            x = x + gate_msa * rms_norm(b.attention_norm2, attn_out, attn_eps)
            ffn_out = self.feed_forward(rms_norm(b.ffn_norm1, x) * scale_mlp)
            x = x + gate_mlp * rms_norm(b.ffn_norm2, ffn_out, ffn_eps)
        else:
            attn_out = self.attention(rms_norm(b.attention_norm1, x), cos, sin, mask)
            x = x + rms_norm(b.attention_norm2, attn_out, attn_eps)
            x = x + rms_norm(b.ffn_norm2, self.feed_forward(rms_norm(b.ffn_norm1, x)), ffn_eps)
        return x


class StaticZImageDenoiser(nn.Module):
    """Fixed-shape, tensor-in/tensor-out form of diffusers' `ZImageTransformer2DModel` (basic mode).

    Weights are the transformer's own modules, registered here under shorter names.
    """

    def __init__(self, transformer: nn.Module, downscale_log2: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        cfg = transformer.config
        if PATCH_SIZE not in tuple(cfg.all_patch_size) or 1 not in tuple(cfg.all_f_patch_size):
            raise ValueError(
                f"StaticZImageDenoiser needs patch size {PATCH_SIZE} and frame patch 1; the transformer has "
                f"all_patch_size={cfg.all_patch_size}, all_f_patch_size={cfg.all_f_patch_size}"
            )
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.dim = cfg.dim
        self.t_scale = float(cfg.t_scale)
        key = f"{PATCH_SIZE}-1"
        self.t_embedder = transformer.t_embedder
        self.x_embedder = transformer.all_x_embedder[key]
        self.final_layer = transformer.all_final_layer[key]
        self.cap_embedder = transformer.cap_embedder
        self.x_pad_token = transformer.x_pad_token
        self.cap_pad_token = transformer.cap_pad_token
        self.noise_refiner = nn.ModuleList(StaticBlock(b) for b in transformer.noise_refiner)
        self.context_refiner = nn.ModuleList(StaticBlock(b) for b in transformer.context_refiner)
        self.layers = nn.ModuleList(StaticBlock(b) for b in transformer.layers)
        self.set_downscale(downscale_log2 or {})
        # Main layers after which a ControlNet's hints join the stream (diffusers' `controlnet_block_samples`
        # keys); empty: no hints (text-to-image, and every engine built without a ControlNet).
        self.control_places: tuple[int, ...] = ()
        self.attention_backend = "sdpa"
        self.fused_kernels = False

        # Timestep frequencies as diffusers computes them (fp32).
        device = self.x_pad_token.device
        half = self.t_embedder.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("t_freqs", freqs.to(device), persistent=False)
        # RoPE tables per axis, built exactly as diffusers' RopeEmbedder (fp64 angles -> fp32 -> polar).
        self.axes_lens = list(cfg.axes_lens)
        for axis, (dim, length) in enumerate(zip(cfg.axes_dims, cfg.axes_lens)):
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv).float()
            table = torch.polar(torch.ones_like(angles), angles)
            self.register_buffer(f"rope_cos_{axis}", table.real.contiguous().to(device), persistent=False)
            self.register_buffer(f"rope_sin_{axis}", table.imag.contiguous().to(device), persistent=False)

    # -- configuration -------------------------------------------------------------------------
    def named_blocks(self):
        for group in ("noise_refiner", "context_refiner", "layers"):
            for i, block in enumerate(getattr(self, group)):
                yield f"{group}.{i}", block

    def set_downscale(self, downscale_log2: dict[str, tuple[int, int]]) -> None:
        names = dict(self.named_blocks())
        unknown = sorted(set(downscale_log2) - set(names))
        if unknown:
            raise ValueError(f"downscale_log2 names unknown blocks {unknown}; blocks are {list(names)}")
        for name, block in names.items():
            block.set_downscale(*downscale_log2.get(name, (0, 0)))

    def set_control_places(self, places) -> None:
        """The main layers whose output a ControlNet hint is added to, in hint order (a ControlNet's
        `control_layers_places`); `()` takes no hints."""
        places = tuple(int(p) for p in places)
        bad = [p for p in places if not 0 <= p < len(self.layers)]
        if bad or len(set(places)) != len(places):
            raise ValueError(f"control places {list(places)} must be distinct main-layer indices in "
                             f"0..{len(self.layers) - 1} (this transformer has {len(self.layers)} layers)")
        self.control_places = places

    def set_attention_backend(self, backend: str) -> None:
        """Every block's attention op becomes the resolved backend's ('sdpa', 'fa3' or 'fa3-fp8'; see
        model/attention.py). Resolve 'auto' first with `attention.resolve_attention_backend`."""
        op = attention_backends.attention_op(backend)
        for _, block in self.named_blocks():
            block.attention_op = op
        self.attention_backend = backend

    def set_fused_kernels(self, on: bool, residual_norms: bool = True, fp8_epilogues: bool | None = None) -> None:
        """Triton kernels for the element-wise chains Inductor leaves slow (see model/fused_kernels.py);
        `residual_norms=False` leaves the gate/residual/norm chains to Inductor (to measure the kernel);
        `fp8_epilogues`: see `StaticBlock.set_fused_kernels`."""
        for _, block in self.named_blocks():
            block.set_fused_kernels(on, residual_norms, fp8_epilogues)
        self.fused_kernels = bool(on)

    def downscale(self) -> dict[str, tuple[int, int]]:
        return {n: (b.attn_log2, b.ffn_log2) for n, b in self.named_blocks() if b.attn_log2 or b.ffn_log2}

    def quantize_fp8(self, keep=()) -> None:
        """FP8 (e4m3) weights and activations for every block's projections but those of the blocks
        named in `keep` (kept bf16: the FP8 quality policy, compiler/fp8_policy.py); the rest stays 16-bit.

        Converts the shared transformer's blocks in place: the 16-bit projection weights are dropped.
        """
        if self.dtype != torch.bfloat16:
            raise ValueError(f"FP8 engines keep their 16-bit parts in bfloat16; the model is {self.dtype}")
        names = dict(self.named_blocks())
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise ValueError(f"fp8 keep list names unknown blocks {unknown}; blocks are {list(names)}")
        for name, block in names.items():
            if name not in keep:
                quantize_block_fp8(block.block)
            block.set_downscale(0, 0)  # bf16 range: no fp16 downscaling needed
        self.fp8_keep = sorted(keep)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    @property
    def caption_dim(self) -> int:
        """Features per caption row (the text encoder's hidden size)."""
        return self.cap_embedder[1].in_features

    @property
    def max_caption_capacity(self) -> int:
        # Caption row i sits at position 1 + i and the image at P + 1: both must stay in the table.
        return self.axes_lens[0] - 2

    # -- the maths -----------------------------------------------------------------------------
    def timestep_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        args = (timestep.float() * self.t_scale)[:, None] * self.t_freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        mlp = self.t_embedder.mlp
        return mlp(t_freq.to(mlp[0].weight.dtype)).to(self.dtype)

    def rope(self, axis: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"rope_cos_{axis}")[index], getattr(self, f"rope_sin_{axis}")[index]

    def image_rope(self, padded_cap: torch.Tensor, ht: int, wt: int, n_pad: int):
        """cos/sin [B, N_img + n_pad, 1, D/2] for image tokens at (P + 1, row, col), pads at (0, 0, 0)."""
        batch = padded_cap.shape[0]
        n_img = ht * wt
        device = padded_cap.device
        token = torch.arange(n_img, device=device)
        rows = token // wt  # (repeat_interleave and % by a symbolic size mis-export to ONNX)
        cols = token - rows * wt
        out = []
        for table_index in (0, 1):  # 0: cos, 1: sin
            t0 = self.rope(0, padded_cap + 1)[table_index]  # [B, d0/2]
            t1 = self.rope(1, rows)[table_index]  # [N, d1/2]
            t2 = self.rope(2, cols)[table_index]
            real = torch.cat(
                [t0[:, None, :].expand(batch, n_img, -1), t1[None].expand(batch, -1, -1), t2[None].expand(batch, -1, -1)],
                dim=-1,
            )
            zero_pos = torch.cat([self.rope(a, torch.zeros(1, dtype=torch.long, device=device))[table_index] for a in (0, 1, 2)], dim=-1)
            pads = zero_pos[None].expand(batch, n_pad, -1)
            out.append(torch.cat([real, pads], dim=1)[:, :, None, :])
        return out[0], out[1]

    def caption_rope(self, capacity: int, batch: int, device):
        idx = torch.arange(capacity, device=device)
        zeros = torch.zeros_like(idx)
        out = []
        for table_index in (0, 1):
            t = torch.cat([self.rope(0, idx + 1)[table_index], self.rope(1, zeros)[table_index], self.rope(2, zeros)[table_index]], dim=-1)
            out.append(t[None, :, None, :].expand(batch, -1, -1, -1))
        return out[0], out[1]

    def forward(self, latents, timestep, cap_feats, cap_lens, mask_caption_keys: bool = True, controlnet_hints=None,
                control=None):
        """`mask_caption_keys=False` skips the caption key mask: valid only when every item's padded
        caption length equals the caption capacity C (the GPU runtime calls it that way so attention
        runs on the fastest fused kernels, which take no mask). Exported engines always mask.

        `controlnet_hints`: [P, B, S, dim] in the model dtype, S = padded image tokens + C (the joint
        sequence, image first); hint k is added to the stream after main layer `control_places[k]`.
        `control`: a `model.controlnet.ControlStep`, a ControlNet run inside this forward (see run_blocks)."""
        stream = self.embed(latents, timestep, cap_feats, cap_lens, mask_caption_keys)
        if controlnet_hints is not None:
            batch, tokens = stream.x.shape[0], stream.x.shape[1] + stream.cap.shape[1]
            check_hints(controlnet_hints, len(self.control_places), batch, tokens, self.dim)
        hidden = self.run_blocks(stream.x, stream.cap, stream.img_rope, stream.cap_rope, None, stream.cap_mask,
                                 stream.unified_mask, stream.adaln, hints=controlnet_hints, control=control)
        batch, channels, height, width = latents.shape
        return unpatchify(self.final_layer(hidden[:, :stream.n_img], c=stream.adaln), batch, channels, height, width)

    def embed(self, latents, timestep, cap_feats, cap_lens, mask_caption_keys: bool = True) -> "Stream":
        """The inputs as the blocks take them: embedded image tokens and caption rows, RoPE, masks, adaLN."""
        batch, channels, height, width = latents.shape
        capacity = cap_feats.shape[1]
        ht, wt = height // PATCH_SIZE, width // PATCH_SIZE
        n_img = ht * wt
        n_pad = (-n_img) % SEQ_MULTI_OF
        dtype = self.dtype
        device = latents.device

        adaln = self.timestep_embedding(timestep)
        x = self.embed_image_tokens(self.x_embedder, latents)

        # Caption rows: embed; rows past each item's real length become cap_pad_token.
        cap_lens = cap_lens.to(torch.long)
        padded_cap = (cap_lens.clamp(min=1) + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        row = torch.arange(capacity, device=device)[None, :]
        cap = self.cap_embedder(cap_feats.to(dtype))
        cap = torch.where((row < cap_lens[:, None])[..., None], cap, self.cap_pad_token.to(dtype))

        img_rope = self.image_rope(padded_cap, ht, wt, n_pad)
        cap_rope = self.caption_rope(capacity, batch, device)
        cap_mask = unified_mask = None
        if mask_caption_keys:
            cap_keys = row < padded_cap[:, None]  # [B, C]
            cap_mask = cap_keys[:, None, None, :]
            img_keys = torch.ones(batch, n_img + n_pad, dtype=torch.bool, device=device)
            unified_mask = torch.cat([img_keys, cap_keys], dim=1)[:, None, None, :]
        return Stream(x, cap, img_rope, cap_rope, cap_mask, unified_mask, adaln, n_img)

    def embed_image_tokens(self, embedder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Patchify "c (h ph) (w pw) -> (h w) (ph pw c)", embed, pad to a multiple of 32 with x_pad_token
        (the image latents through x_embedder; a ControlNet's context through its own embedder)."""
        batch, channels, height, width = latents.shape
        ht, wt = height // PATCH_SIZE, width // PATCH_SIZE
        n_img = ht * wt
        x = latents.to(self.dtype).reshape(batch, channels, ht, PATCH_SIZE, wt, PATCH_SIZE)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(batch, n_img, PATCH_SIZE * PATCH_SIZE * channels)
        x = embedder(x)
        pads = self.x_pad_token.to(self.dtype)[None].expand(batch, (-n_img) % SEQ_MULTI_OF, -1)
        return torch.cat([x, pads], dim=1)

    def refine(self, x, cap, img_rope, cap_rope, img_mask, cap_mask, adaln):
        """The noise refiner over the image tokens, the context refiner over the caption rows; returns the
        joint stream [image | caption] and its RoPE."""
        (img_cos, img_sin), (cap_cos, cap_sin) = img_rope, cap_rope
        for block in self.noise_refiner:
            x = block(x, img_cos, img_sin, img_mask, adaln)
        for block in self.context_refiner:
            cap = block(cap, cap_cos, cap_sin, cap_mask)
        rope = (torch.cat([img_cos, cap_cos], dim=1), torch.cat([img_sin, cap_sin], dim=1))
        return torch.cat([x, cap], dim=1), rope

    def run_blocks(self, x, cap, img_rope, cap_rope, img_mask, cap_mask, unified_mask, adaln, hints=None,
                   control=None):
        """The block schedule: `refine`, then the main layers over [image | caption], a ControlNet hint (if
        any) added after each of `control_places`, as diffusers adds `controlnet_block_samples[i]`.
        `control` (a `model.controlnet.ControlStep`) computes the hints here, from this step's own refined
        tokens. Sequence parallelism runs it on its shards."""
        hidden, (cos, sin) = self.refine(x, cap, img_rope, cap_rope, img_mask, cap_mask, adaln)
        places = {place: k for k, place in enumerate(self.control_places)} if hints is not None else {}
        if control is not None:
            hints = control.hints(self, x, hidden, img_rope, (cos, sin), unified_mask, adaln)
            places = {place: k for k, place in enumerate(control.net.control_places)}
        for index, block in enumerate(self.layers):
            hidden = block(hidden, cos, sin, unified_mask, adaln)
            if index in places:
                hidden = hidden + hints[places[index]]
        return hidden


@dataclass
class Stream:
    """A step's inputs as the blocks take them (`StaticZImageDenoiser.embed`)."""

    x: torch.Tensor  # [B, N_img + n_pad, dim] embedded image tokens
    cap: torch.Tensor  # [B, C, dim] embedded caption rows
    img_rope: tuple[torch.Tensor, torch.Tensor]
    cap_rope: tuple[torch.Tensor, torch.Tensor]
    cap_mask: torch.Tensor | None
    unified_mask: torch.Tensor | None
    adaln: torch.Tensor
    n_img: int


def check_hints(hints, places: int, batch: int, tokens: int, dim: int) -> None:
    """ControlNet hints are [places, batch, joint tokens, dim]: one residual per control place."""
    expected = (places, batch, tokens, dim)
    if tuple(hints.shape) != expected:
        raise ValueError(f"controlnet_hints has shape {tuple(hints.shape)}, expected {expected} "
                         f"(control places, batch, image tokens padded to 32 + caption capacity, model dim)")


def unpatchify(out: torch.Tensor, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Final-layer tokens [B, h*w, p*p*C] -> latents [B, C, H, W] float32: "(h w) (ph pw c) -> c (h ph) (w pw)"."""
    ht, wt = height // PATCH_SIZE, width // PATCH_SIZE
    out = out.reshape(batch, ht, wt, PATCH_SIZE, PATCH_SIZE, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(batch, channels, height, width).float()
