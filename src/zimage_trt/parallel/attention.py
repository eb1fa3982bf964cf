"""Ulysses attention: each rank holds a slice of the tokens with every head; an all-to-all turns that
into every token with a slice of the heads, the block's own attention op runs on it, and a second
all-to-all turns the result back.

    q, k, v   [B, S/P, H, D]   this rank's tokens, all heads
    -> pad    [B, S/P, Hp, D]  Hp = P * ceil(H / P): zero heads at the end when P does not divide H
    -> a2a -> [B, S, Hp/P, D]  every rank's tokens (rank 0's first), this rank's heads
    -> the wrapped op (SDPA, FlashAttention, ...) with the key mask over the gathered sequence
    -> a2a -> [B, S/P, Hp, D]  -> the first H heads

Any degree up to H therefore runs (Z-Image's 30 heads: 4 and 8 GPUs pad to 32). The zero heads cannot
change the real ones: every attention op computes each head from that head's q, k and v alone, and the
padded heads are dropped after the second all-to-all. (What they compute is 0 anyway: q = k = 0 gives
equal scores, a uniform softmax over the unmasked keys, and v = 0 makes its output 0, finite with or
without a key mask and through FA3's per-head FP8 scales, which clamp a zero amax.) Their cost: every
rank attends with ceil(H / P) heads, which a split of unequal shares would not improve (the slowest
rank sets the pace), and the all-to-alls carry Hp / H as many bytes (32 / 30 at 4 and 8 GPUs).

q, k and v travel in one all-to-all. The collectives are torch's functional ones, which
torch.compile traces into the block's graph (and which run eagerly as well), over NCCL or gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .group import heads_per_rank


class UlyssesAttention:
    """An attention op (q, k, v, mask) -> out, all [B, S, H, D], spread over the ranks of `group`.

    `mask` is the key mask over the sequence as gathered (every rank's tokens, rank 0's first), or None.
    """

    def __init__(self, inner, group: dist.ProcessGroup, degree: int):
        self.inner = inner
        self.group = group
        self.degree = degree

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        p = self.degree
        batch, local, heads, dim = q.shape
        share = heads_per_rank(heads, p)
        qkv = torch.stack((q, k, v))  # [3, B, S/P, H, D]
        if share * p != heads:
            qkv = F.pad(qkv, (0, 0, 0, share * p - heads))  # zero heads after the real ones
        # [3, B, S/P, P, Hp/P, D] -> [P, 3, B, S/P, Hp/P, D]: chunk j (heads of rank j) goes to rank j.
        qkv = qkv.view(3, batch, local, p, share, dim).permute(3, 0, 1, 2, 4, 5).contiguous()
        qkv = funcol.all_to_all_single(qkv, None, None, self.group)
        # Received chunk j is rank j's tokens: [P, 3, B, S/P, Hp/P, D] -> [3, B, S, Hp/P, D].
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, p * local, share, dim)
        out = self.inner(qkv[0], qkv[1], qkv[2], mask)  # [B, S, Hp/P, D]
        # Back: chunk j (rank j's tokens) goes to rank j; received chunk j is head slice j.
        out = out.reshape(batch, p, local, share, dim).transpose(0, 1).contiguous()
        out = funcol.all_to_all_single(out, None, None, self.group)
        out = out.permute(1, 2, 0, 3, 4).reshape(batch, local, share * p, dim)
        return out if share * p == heads else out[:, :, :heads]


# (torch 2.13 renamed all_gather_tensor; older releases have only the old name)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """[B, S/P, F] on each rank -> [B, S, F] on every rank (rank 0's tokens first)."""
    batch, local, features = x.shape
    gathered = _all_gather(x.contiguous(), 0, group)  # [P * B, S/P, F]
    return gathered.view(degree, batch, local, features).transpose(0, 1).reshape(batch, degree * local, features)
