"""The static denoiser with its token sequences split over the ranks of a sequence-parallel group.

Each rank holds every weight and 1/P of each token sequence, and computes exactly what
`StaticZImageDenoiser.forward` computes for those tokens:

- the image tokens (the model's own padding to a multiple of 32 included) and the caption rows are
  each padded to a multiple of P and cut into P equal slices, rank r taking slice r of both; the
  padding added here is masked out as attention keys (none is needed for P = 2: both sequences are
  multiples of 32), its queries computed and dropped;
- the refiners run on the image slice (noise_refiner) and the caption slice (context_refiner);
- the main layers run on [image slice | caption slice]: the all-to-all in attention gathers the ranks'
  sequences one after the other, so the gathered order is [img_0 | cap_0 | img_1 | cap_1 | ...], a
  permutation of diffusers' [image | caption]. Attention does not depend on the order of its keys
  (RoPE positions travel with the tokens, the key mask is permuted the same way), and every other
  part of a block works token by token, so the result is the same;
- RoPE tables are built for the whole sequence as in one process and sliced; the timestep embedding
  (modulation) is computed on every rank;
- the final layer runs on each rank's image tokens, and one all-gather gives every rank the whole
  output, so the Euler update (and the image) is the same on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.denoiser import StaticZImageDenoiser, unpatchify
from ..model.shapes import PATCH_SIZE, SEQ_MULTI_OF, round_up
from .attention import UlyssesAttention, gather_tokens
from .group import ParallelGroup, check_degree


def _slice_rows(t: torch.Tensor, total: int, start: int, stop: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Rows [start, stop) of t (dim 1) where rows at or past `total`, beyond t, are `fill`."""
    real = t[:, start:min(stop, total)]
    missing = stop - max(start, total)
    if missing <= 0:
        return real
    shape = (t.shape[0], missing, *t.shape[2:])
    pad = fill.expand(shape) if isinstance(fill, torch.Tensor) else t.new_full(shape, fill)
    return torch.cat([real, pad.to(t.dtype)], dim=1)


class SequenceShardedDenoiser(nn.Module):
    """`StaticZImageDenoiser` run by the ranks of `group` together; same inputs and output on every rank."""

    def __init__(self, denoiser: StaticZImageDenoiser, group: ParallelGroup):
        super().__init__()
        heads = denoiser.layers[0].block.attention.heads if len(denoiser.layers) else denoiser.config.n_heads
        check_degree(group.degree, heads)
        self.denoiser = denoiser
        self.degree, self.rank, self.process_group = group.degree, group.rank, group.data
        for name, block in denoiser.named_blocks():
            if isinstance(block.attention_op, UlyssesAttention):
                raise ValueError(f"block {name} is already sequence-parallel: a denoiser is wrapped once")
            # Whatever attention op the block has (SDPA, a FlashAttention backend) runs inside.
            block.attention_op = UlyssesAttention(block.attention_op, group.data, group.degree)

    # The engines read these from their denoiser.
    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def forward(self, latents, timestep, cap_feats, cap_lens, mask_caption_keys: bool = True, controlnet_hints=None):
        if controlnet_hints is not None:  # (hints would need the same sharding as the stream)
            raise ValueError("sequence parallelism does not take ControlNet hints yet: run a ControlNet "
                             "pipeline with sequence_parallel=1")
        d, p, r = self.denoiser, self.degree, self.rank
        batch, channels, height, width = latents.shape
        capacity = cap_feats.shape[1]
        ht, wt = height // PATCH_SIZE, width // PATCH_SIZE
        n_img = ht * wt
        n_pad = (-n_img) % SEQ_MULTI_OF
        n_tokens = n_img + n_pad  # image tokens in one process (its padding to 32 included)
        img_local, cap_local = round_up(n_tokens, p) // p, round_up(capacity, p) // p
        img_lo, cap_lo = r * img_local, r * cap_local
        dtype, device = d.dtype, latents.device

        adaln = d.timestep_embedding(timestep)

        # Image tokens: patchify, embed this rank's real ones, x_pad_token for padding (the model's and ours).
        x = latents.to(dtype).reshape(batch, channels, ht, PATCH_SIZE, wt, PATCH_SIZE)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(batch, n_img, PATCH_SIZE * PATCH_SIZE * channels)
        x = d.x_embedder(x[:, img_lo:min(img_lo + img_local, n_img)])
        x = _slice_rows(x, max(0, min(img_local, n_img - img_lo)), 0, img_local, d.x_pad_token.to(dtype)[None])

        # Caption rows: embed this rank's; rows past each item's length become cap_pad_token.
        cap_lens = cap_lens.to(torch.long)
        padded_cap = (cap_lens.clamp(min=1) + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        row = torch.arange(p * cap_local, device=device)[None, :]
        mine = row[:, cap_lo:cap_lo + cap_local]
        cap = d.cap_embedder(_slice_rows(cap_feats.to(dtype), capacity, cap_lo, cap_lo + cap_local))
        cap = torch.where((mine < cap_lens[:, None])[..., None], cap, d.cap_pad_token.to(dtype))

        img_cos, img_sin = (_slice_rows(t, n_tokens, img_lo, img_lo + img_local) for t in d.image_rope(padded_cap, ht, wt, n_pad))
        cap_cos, cap_sin = (_slice_rows(t, capacity, cap_lo, cap_lo + cap_local) for t in d.caption_rope(capacity, batch, device))

        # Key masks over the gathered sequences; None where nothing is masked (the fastest kernels).
        img_keys = (torch.arange(p * img_local, device=device) < n_tokens)[None].expand(batch, -1)
        cap_keys = row < capacity
        if mask_caption_keys:
            cap_keys = cap_keys & (row < padded_cap[:, None])
        cap_keys = cap_keys.expand(batch, -1)
        img_mask = None if p * img_local == n_tokens else img_keys[:, None, None, :]
        cap_mask = None if p * cap_local == capacity and not mask_caption_keys else cap_keys[:, None, None, :]
        unified_mask = None
        if img_mask is not None or cap_mask is not None:
            per_rank = [torch.cat([img_keys.unflatten(1, (p, img_local))[:, j], cap_keys.unflatten(1, (p, cap_local))[:, j]], dim=1)
                        for j in range(p)]
            unified_mask = torch.cat(per_rank, dim=1)[:, None, None, :]

        hidden = d.run_blocks(x, cap, (img_cos, img_sin), (cap_cos, cap_sin), img_mask, cap_mask, unified_mask, adaln)
        out = d.final_layer(hidden[:, :img_local], c=adaln)
        out = gather_tokens(out, self.process_group, p)[:, :n_img]
        return unpatchify(out, batch, channels, height, width)


def shard_engine(engine, group: ParallelGroup, *, cuda_graph: bool = False):
    """Make an engine that runs the static denoiser (eager or torch-compiled) sequence-parallel, in place.

    The engine keeps its own way of running (compiled blocks, attention-kernel choice); only the
    denoiser it calls is swapped for the sharded one. `cuda_graph`: whether the runtime may capture a
    step, collectives included, in a CUDA graph (the pipeline's default: on, measured faster).
    """
    if isinstance(getattr(engine, "denoiser", None), SequenceShardedDenoiser):
        return engine
    if not isinstance(getattr(engine, "denoiser", None), StaticZImageDenoiser):
        raise ValueError(
            f"sequence parallelism runs the eager or torch-compiled engines; this one is {engine.kind!r} "
            "(a TensorRT engine is one fixed graph per GPU): build with --backend torch-compiled")
    engine.denoiser = SequenceShardedDenoiser(engine.denoiser, group)
    engine.supports_cuda_graph = bool(engine.supports_cuda_graph and cuda_graph)
    return engine
