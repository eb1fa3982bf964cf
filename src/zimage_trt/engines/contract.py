"""The denoiser engine's inputs and outputs: the one place their names, order, shapes and dtypes are spelled.

    latents     [B, 16, h, w]  float32   the latent image
    timestep    [B]            float32   diffusers' model timestep, (1000 - t) / 1000, in [0, 1]
    cap_feats   [B, C, F]      engine    text-encoder features, each item's L real rows first
    cap_lens    [B]            int64     L per item, 1 <= L <= C
    ->  noise_pred [B, 16, h, w] float32 the model output

A ControlNet-ready engine takes one more input (its variant; a plain engine pays nothing for it):

    controlnet_hints [P, B, S, D] engine  one residual per control place (main layer index, in the
                                          manifest), added after that layer; S = image tokens padded to
                                          32 + C, D = the model's width

The ONNX export, the TensorRT profiles, the engines, the runtime's buffers and the build's warm-up and
calibration all take the names and shapes from here.
"""

from __future__ import annotations

import torch

from ..model.shapes import LATENT_CHANNELS, PATCH_SIZE, SEQ_MULTI_OF, round_up

INPUT_NAMES = ("latents", "timestep", "cap_feats", "cap_lens")
OUTPUT_NAMES = ("noise_pred",)
LATENTS, TIMESTEP, CAPTION_FEATURES, CAPTION_LENGTHS = INPUT_NAMES
(NOISE_PRED,) = OUTPUT_NAMES
CONTROLNET_HINTS = "controlnet_hints"
CONTROLNET_INPUT_NAMES = (*INPUT_NAMES, CONTROLNET_HINTS)


def hint_shape(places: int, batch: int, latent_hw: tuple[int, int], caption_capacity: int, dim: int) -> tuple[int, ...]:
    """The shape of `controlnet_hints` for one engine call: [places, batch, joint tokens, dim]."""
    tokens = round_up((latent_hw[0] // PATCH_SIZE) * (latent_hw[1] // PATCH_SIZE), SEQ_MULTI_OF) + caption_capacity
    return (places, batch, tokens, dim)


def input_shapes(batch: int, latent_hw: tuple[int, int], caption_capacity: int, caption_dim: int,
                 channels: int = LATENT_CHANNELS) -> dict[str, tuple[int, ...]]:
    """The shape of each input for one engine call, by name."""
    return dict(zip(INPUT_NAMES, (
        (batch, channels, *latent_hw), (batch,), (batch, caption_capacity, caption_dim), (batch,)), strict=True))


def controlnet_input_shapes(places: int, batch: int, latent_hw: tuple[int, int], caption_capacity: int,
                            caption_dim: int, dim: int, channels: int = LATENT_CHANNELS) -> dict[str, tuple[int, ...]]:
    """The shape of each input of a ControlNet-ready engine (`places` hints) for one call, by name."""
    return {**input_shapes(batch, latent_hw, caption_capacity, caption_dim, channels),
            CONTROLNET_HINTS: hint_shape(places, batch, latent_hw, caption_capacity, dim)}


def input_dtypes(feature_dtype: torch.dtype, controlnet: bool = False) -> dict[str, torch.dtype]:
    """The dtype of each input: captions (and a ControlNet-ready engine's hints) in the engine's dtype, the
    rest fixed."""
    dtypes = dict(zip(INPUT_NAMES, (torch.float32, torch.float32, feature_dtype, torch.long), strict=True))
    return {**dtypes, CONTROLNET_HINTS: feature_dtype} if controlnet else dtypes


def as_feed(inputs, controlnet_hints=None) -> dict:
    """(latents, timestep, cap_feats, cap_lens) [+ hints of a ControlNet-ready engine] -> {name: value}."""
    feed = dict(zip(INPUT_NAMES, inputs, strict=True))
    return feed if controlnet_hints is None else {**feed, CONTROLNET_HINTS: controlnet_hints}


def example_hints(places: int, batch: int, latent_hw: tuple[int, int], caption_capacity: int, dim: int,
                  dtype: torch.dtype, device, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-normal `controlnet_hints` of the contract's shape (for export, warm-up and checks)."""
    shape = hint_shape(places, batch, latent_hw, caption_capacity, dim)
    return torch.randn(shape, generator=generator).to(device, dtype)


def example_inputs(batch: int, latent_hw: tuple[int, int], caption_capacity: int, caption_dim: int,
                   feature_dtype: torch.dtype, device, *, caption_length: int | None = None,
                   channels: int = LATENT_CHANNELS, generator: torch.Generator | None = None):
    """Random inputs of the contract's shapes and dtypes (for export, warm-up and checks): unit-normal
    latents and features, timestep 0.5, every caption `caption_length` long (default: the capacity)."""
    shapes, dtypes = input_shapes(batch, latent_hw, caption_capacity, caption_dim, channels), input_dtypes(feature_dtype)
    length = caption_capacity if caption_length is None else caption_length
    return (
        torch.randn(shapes[LATENTS], generator=generator).to(device, dtypes[LATENTS]),
        torch.full(shapes[TIMESTEP], 0.5, dtype=dtypes[TIMESTEP], device=device),
        torch.randn(shapes[CAPTION_FEATURES], generator=generator).to(device, dtypes[CAPTION_FEATURES]),
        torch.full(shapes[CAPTION_LENGTHS], length, dtype=dtypes[CAPTION_LENGTHS], device=device),
    )
