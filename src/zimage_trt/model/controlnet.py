"""`StaticZImageControlNet`: diffusers' `ZImageControlNetModel`, re-expressed for fixed shapes.

diffusers' ControlNet (models/controlnets/controlnet_z_image.py) takes the transformer's embedders, RoPE,
pad tokens and refiners (`from_transformer`) and, every step, recomputes the transformer's noise and
context refiners before its own blocks. Here it runs inside the static denoiser's step instead
(`StaticZImageDenoiser.run_blocks(control=ControlStep(...))`), on that step's own tensors:

- the control context (the encoded control image, for inpainting also the mask and the masked image's
  latents: `control_in_dim` channels) is patchified and embedded like the image, pad rows x_pad_token;
- Union v1 (`add_control_noise_refiner=None`): `control_noise_refiner` (plain transformer blocks) runs over
  the control tokens; the control layers then take the denoiser's own refined [image | caption] stream
  (nothing recomputed);
- Union 2.0 (`"control_layers"`) and 2.1 (`"control_noise_refiner"`): control blocks first run over the
  control tokens with the embedded image tokens, their first outputs become hints added after the
  transformer's noise-refiner layers `control_refiner_layers_places`; that hinted noise refiner is
  recomputed (the transformer's own blocks, through this engine's StaticBlocks) and the control layers
  take [hinted image | the denoiser's refined captions];
- control layer k: block 0 starts from before_proj(c) + stream, each block's after_proj(output) times
  its scale is the hint added after main layer `control_layers_places[k]`.

The blocks are `StaticBlock`s over the ControlNet's own modules (`core` below): the same attention
backends, fused kernels, fp16 downscaling and FP8 conversion as the denoiser's, and under torch.compile
the same compiled graphs (same code, same shapes as the main layers / refiners).

Scales: `scales` holds one float per control place, in the order the hints are made: the noise-refiner
places (2.x models) first, then the layer places. A single conditioning scale is that value everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .denoiser import StaticBlock, StaticZImageDenoiser
from .fp16_range import FP16_SAFE_MAGNITUDE, calibration_inputs, downscale_from_peaks, tracking_peaks
from .fp8 import is_fp8_block, quantize_block_fp8
from .shapes import PATCH_SIZE

VARIANTS = (None, "control_layers", "control_noise_refiner")  # Union v1, 2.0, 2.1
# fp16 engines measure the ControlNet's peaks with every block pre-shrunk by 2^this (so nothing overflows
# while measuring; RMSNorm undoes the shrink exactly), then keep the smallest shrink that is safe.
MEASURE_SHRINK_LOG2 = 10


class ControlNetMismatch(ValueError):
    """A ControlNet that does not fit this transformer (dim, heads, places, patch size, dtype)."""


def hint_count(config) -> int:
    """How many hints (and scales) a ControlNet makes: its noise-refiner places (2.x), then its layer places."""
    refiner = list(config.control_refiner_layers_places or []) if config.add_control_noise_refiner else []
    return len(refiner) + len(config.control_layers_places or [])


def check_fits(config, transformer_config) -> None:
    """Refuse, naming both sides, a ControlNet whose width, heads or places this transformer cannot take."""
    t = transformer_config
    layers, refiners = int(t.n_layers), int(t.n_refiner_layers)
    problems = []
    if int(config.dim) != int(t.dim):
        problems.append(f"dim {config.dim} vs the transformer's {t.dim}")
    if int(config.n_heads) != int(t.n_heads):
        problems.append(f"n_heads {config.n_heads} vs the transformer's {t.n_heads}")
    if PATCH_SIZE not in tuple(config.all_patch_size) or 1 not in tuple(config.all_f_patch_size):
        problems.append(f"all_patch_size {tuple(config.all_patch_size)} has no {PATCH_SIZE} (the denoiser's)")
    places = list(config.control_layers_places or [])
    if not places or any(not 0 <= p < layers for p in places) or len(set(places)) != len(places):
        problems.append(f"control_layers_places {places} are not distinct main-layer indices of the "
                        f"transformer's {layers} layers (0..{layers - 1})")
    if config.add_control_noise_refiner not in VARIANTS:
        problems.append(f"add_control_noise_refiner {config.add_control_noise_refiner!r} is not one of {VARIANTS}")
    elif config.add_control_noise_refiner is not None:
        refiner = list(config.control_refiner_layers_places or [])
        if any(not 0 <= p < refiners for p in refiner) or len(set(refiner)) != len(refiner):
            problems.append(f"control_refiner_layers_places {refiner} are not distinct indices of the "
                            f"transformer's {refiners} noise-refiner layers")
    if int(config.control_in_dim) < int(t.in_channels):
        problems.append(f"control_in_dim {config.control_in_dim} is less than the {t.in_channels} latent "
                        f"channels of a control image")
    if problems:
        raise ControlNetMismatch("this ControlNet does not fit the transformer: " + "; ".join(problems))


class StaticControlBlock(nn.Module):
    """One `ZImageControlTransformerBlock`: (block 0) before_proj(c) + stream, the block maths on c, and
    after_proj of its output, the hint."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.core = StaticBlock(block)
        self.before_proj = block.before_proj if block.block_id == 0 else None
        self.after_proj = block.after_proj

    def forward(self, c, stream, cos, sin, mask, adaln, hint: bool = True):
        if self.before_proj is not None:
            c = self.before_proj(c) + stream
        c = self.core(c, cos, sin, mask, adaln)
        return c, (self.after_proj(c) if hint else None)


class StaticZImageControlNet(nn.Module):
    """A ControlNet's static form for one denoiser (an engine's): its own blocks as StaticBlocks, the
    denoiser's embedders, pad tokens, RoPE and refiners shared."""

    def __init__(self, controlnet: nn.Module, denoiser: StaticZImageDenoiser):
        super().__init__()
        cfg = controlnet.config
        check_fits(cfg, denoiser.config)
        weight = controlnet.control_all_x_embedder[f"{PATCH_SIZE}-1"].weight
        if weight.dtype != denoiser.dtype or weight.device != denoiser.device:
            raise ControlNetMismatch(f"the ControlNet is {weight.dtype} on {weight.device}, the transformer "
                                     f"{denoiser.dtype} on {denoiser.device}: load it in the pipeline's dtype")
        self.config = cfg
        self.variant = cfg.add_control_noise_refiner
        self.control_places = tuple(int(p) for p in cfg.control_layers_places)
        self.refiner_places = tuple(int(p) for p in (cfg.control_refiner_layers_places or ())) if self.variant else ()
        self.control_in_dim = int(cfg.control_in_dim)
        self.embedder = controlnet.control_all_x_embedder[f"{PATCH_SIZE}-1"]
        self.layers = nn.ModuleList(StaticControlBlock(b) for b in controlnet.control_layers)
        self.control_noise_refiner = nn.ModuleList()  # v1: plain blocks over the control tokens
        self.refiner = nn.ModuleList()  # 2.1: control blocks whose hints go into the noise refiner
        if self.variant is None:
            self.control_noise_refiner.extend(StaticBlock(b) for b in controlnet.control_noise_refiner)
        elif self.variant == "control_noise_refiner":
            self.refiner.extend(StaticControlBlock(b) for b in controlnet.control_noise_refiner)
        # 2.0 ("control_layers"): the control layers themselves make the refiner hints, in a first pass.
        self._denoiser = (denoiser,)  # not a submodule: its weights are the transformer's

    @property
    def hint_count(self) -> int:
        """How many scales a call takes: the refiner places, then the layer places."""
        return hint_count(self.config)

    def named_blocks(self):
        for group in ("control_noise_refiner", "refiner", "layers"):
            for i, block in enumerate(getattr(self, group)):
                yield f"controlnet.{group}.{i}", block.core if isinstance(block, StaticControlBlock) else block

    # -- configuration: as the denoiser's engine runs -------------------------------------------
    def configure_like(self, denoiser: StaticZImageDenoiser) -> None:
        """Attention backend, fused kernels and precision of `denoiser` (FP8 layers where its blocks have
        them; fp16: the measured downscale). Converts this ControlNet's blocks in place for FP8."""
        blocks = dict(self.named_blocks())
        if any(is_fp8_block(b.block) for _, b in denoiser.named_blocks()):
            for block in blocks.values():
                quantize_block_fp8(block.block)
                block.set_downscale(0, 0)
        for block in blocks.values():
            block.attention_op = denoiser.layers[0].attention_op
            block.set_fused_kernels(denoiser.fused_kernels)
        if denoiser.dtype == torch.float16:
            self.set_downscale(self.measure_fp16_downscale(denoiser))

    def set_downscale(self, downscale_log2: dict[str, tuple[int, int]]) -> None:
        for name, block in self.named_blocks():
            block.set_downscale(*downscale_log2.get(name, (0, 0)))

    def downscale(self) -> dict[str, tuple[int, int]]:
        return {n: (b.attn_log2, b.ffn_log2) for n, b in self.named_blocks() if b.attn_log2 or b.ffn_log2}

    @torch.no_grad()
    def measure_fp16_downscale(self, denoiser: StaticZImageDenoiser, limit: float = FP16_SAFE_MAGNITUDE):
        """The per-block fp16 shrinks this ControlNet needs, measured as the build measures the denoiser's
        (its calibration input, a seeded control context), in fp16 itself: every block pre-shrunk by
        2^MEASURE_SHRINK_LOG2 so that nothing overflows while measuring, the peaks scaled back."""
        inputs = calibration_inputs(denoiser)
        generator = torch.Generator().manual_seed(1)
        context = torch.randn(inputs[0].shape[0], self.control_in_dim, *inputs[0].shape[2:], generator=generator)
        step = ControlStep(self, context.to(denoiser.device, denoiser.dtype),
                           torch.ones(self.hint_count, device=denoiser.device))
        shrink = MEASURE_SHRINK_LOG2
        self.set_downscale({name: (shrink, shrink) for name, _ in self.named_blocks()})
        try:
            # (eagerly: the engine's compiled blocks would compile the calibration shape)
            with tracking_peaks(self.named_blocks()) as peaks, torch.compiler.set_stance("force_eager"):
                denoiser(*inputs, control=step)
        finally:
            self.set_downscale({})
        return downscale_from_peaks({name: (a * 2.0**shrink, f * 2.0**shrink) for name, (a, f) in peaks.items()},
                                    limit)

    # -- the maths ----------------------------------------------------------------------------
    def hints(self, denoiser: StaticZImageDenoiser, embedded, hidden, img_rope, rope, unified_mask, adaln,
              context, scales) -> list[torch.Tensor]:
        """One hint per `control_places`, [B, joint tokens, dim], scaled: from the denoiser's step tensors
        (`embedded` image tokens before the noise refiner, `hidden` the refined [image | caption] stream)."""
        n_x = embedded.shape[1]
        captions = hidden[:, n_x:]
        img_cos, img_sin = img_rope
        c = denoiser.embed_image_tokens(self.embedder, context)
        n_refiner = len(self.refiner_places)
        if self.variant is None:
            for block in self.control_noise_refiner:
                c = block(c, img_cos, img_sin, None, adaln)
            stream = hidden
        else:
            refiner = self.refiner if self.variant == "control_noise_refiner" else self.layers
            skips = []
            for k, block in enumerate(refiner):
                c, skip = block(c, embedded, img_cos, img_sin, None, adaln, hint=k < n_refiner)
                skips.append(skip)
            places = {place: k for k, place in enumerate(self.refiner_places)}
            x = embedded
            for index, block in enumerate(denoiser.noise_refiner):
                x = block(x, img_cos, img_sin, None, adaln)
                if index in places:
                    x = x + skips[places[index]] * scales[places[index]]
            stream = torch.cat([x, captions], dim=1)
        c = torch.cat([c, captions], dim=1)
        cos, sin = rope
        out = []
        for k, block in enumerate(self.layers):
            c, skip = block(c, stream, cos, sin, unified_mask, adaln)
            out.append(skip * scales[n_refiner + k])
        return out

    @torch.no_grad()
    def forward(self, latents, timestep, cap_feats, cap_lens, context, scales, mask_caption_keys: bool = True):
        """Standalone, as diffusers' model runs (the refiners computed again): the hints [P, B, S, dim] for
        an engine that takes them as an input (engines/contract.py CONTROLNET_HINTS)."""
        denoiser = self._denoiser[0]
        s = denoiser.embed(latents, timestep, cap_feats, cap_lens, mask_caption_keys)
        hidden, rope = denoiser.refine(s.x, s.cap, s.img_rope, s.cap_rope, None, s.cap_mask, s.adaln)
        return torch.stack(self.hints(denoiser, s.x, hidden, s.img_rope, rope, s.unified_mask, s.adaln,
                                      context, scales))


@dataclass
class ControlStep:
    """A ControlNet for one step: its static form, the control context [B, control_in_dim, h, w] (model
    dtype) and one scale per control place (float32); the loop keeps both in persistent buffers."""

    net: StaticZImageControlNet
    context: torch.Tensor
    scales: torch.Tensor

    def hints(self, denoiser, embedded, hidden, img_rope, rope, unified_mask, adaln) -> list[torch.Tensor]:
        return self.net.hints(denoiser, embedded, hidden, img_rope, rope, unified_mask, adaln, self.context, self.scales)
