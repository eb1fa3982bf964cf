"""The PyTorch-native engine format, for GPUs where TensorRT is absent (the H100 here).

An "engine" is the static denoiser compiled by TorchInductor for the built shapes, one compiled
graph per kind of block (30 main layers share one, as diffusers' `compile_repeated_blocks` does),
plus the compiled artefacts persisted by `torch.compiler.save_cache_artifacts` so a fresh process
skips kernel compilation. Weights are not in the engine: the runtime uses the transformer's own
(one copy on the GPU, whatever the number of resolutions).

AOTInductor packages would be the natural format, but they segfault on load on our H100 with torch
2.11 (see DEVICE.md), so the persisted compile cache it is.

Security: the cache artefacts are executable code that torch unpickles, so they are loaded only after
their sha256 matches the manifest the user's own build wrote (`engines.open_denoiser` checks it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch

from ..model.denoiser import StaticZImageDenoiser
from ..model.shapes import Resolution
from . import contract
from .base import DenoiserEngine, TorchDenoiserEngine

ARTIFACT_SUFFIX = ".inductor-cache.bin"


def sdpa_priority_context(device: torch.device):
    """Prefer cuDNN attention: on Hopper it is the fastest SDPA backend at Z-Image's shapes (DEVICE notes
    and BENCHMARKS.md), ahead of flash and memory-efficient attention."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: fall back to its default order
        return contextlib.nullcontext()


class CompiledDenoiserEngine(TorchDenoiserEngine):
    """The static denoiser with each block compiled by torch.compile (regional compilation)."""

    kind = "torch-compiled"

    def __init__(self, denoiser: StaticZImageDenoiser, *, mode: str | None = None):
        super().__init__(denoiser)
        self.mode = mode
        # Shapes: dynamo's automatic-dynamic compiles a block static first, then once more with the
        # sequence length symbolic when a second caption length shows up (warm_up makes sure it does),
        # so any caption length runs without recompiling. Blocks of three kinds x shapes x masks exceed
        # dynamo's default of 8 graphs per code object.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for _, block in denoiser.named_blocks():
            block.compile(fullgraph=True, mode=mode)
        self._attention_ctx = lambda: sdpa_priority_context(self.device)
        # Set by engines.select for an engine opened from a folder: keeps the compile caches under a key
        # (engines/kept_artifacts.py), so the ControlNet's kernels compiled at first use outlive the process.
        self.keep_kernels = None
        self._kept: set[str] = set()

    def _controlnet_ready(self, net) -> None:
        # The ControlNet's blocks are StaticBlocks of the shapes the denoiser's own run: compiled the same
        # way, they mostly reuse the denoiser's graphs; the rest compile at their first step.
        for _, block in net.named_blocks():
            block.compile(fullgraph=True, mode=self.mode)

    def controlnet_kernels_compiled(self, controlnet, latent_shape, model_batch: int) -> None:
        """After a ControlNet's first loop at a shape: keep what was compiled for it, once per shape."""
        config = json.dumps(dict(controlnet.config), sort_keys=True, default=str)
        # (the size WIDTHxHEIGHT, as every size key; artefacts load by their records, whatever their names)
        key = f"{hashlib.sha256(config.encode()).hexdigest()[:12]}-{Resolution.of_latents(latent_shape).key}-b{model_batch}"
        if self.keep_kernels is not None and key not in self._kept:
            self._kept.add(key)
            self.keep_kernels(key)

    @torch.no_grad()
    def run(self, latents, timestep, cap_feats, cap_lens, masked: bool, controlnet_hints=None, control=None) -> torch.Tensor:
        with self._attention_ctx():
            return super().run(latents, timestep, cap_feats, cap_lens, masked, controlnet_hints, control)


def warm_up(engine: DenoiserEngine, shapes, cap_dim: int, progress=None) -> None:
    """Run each (resolution, batch, caption capacity) once so every graph is compiled now.

    A shape's batch is the largest it serves: batch 1 is compiled too, the common case.
    """
    for shape in shapes:
        res = Resolution.parse(shape.resolution)
        for batch in sorted({1, shape.batch}):
            latents, timestep, feats, lens = contract.example_inputs(
                batch, res.latent_hw, shape.caption_capacity, cap_dim, engine.dtype, engine.device)
            # The layouts the runtime uses: captions exactly as long as the buffer (no key mask) at two
            # lengths, so the sequence length becomes symbolic, and a masked batch of unequal captions.
            engine.run(latents, timestep, feats, lens, masked=False)
            if shape.caption_capacity > 32:
                engine.run(latents, timestep, feats[:, :-32], lens - 32, masked=False)
            engine.run(latents, timestep, feats, lens - 1, masked=True)
        if progress is not None:
            progress.update()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def compile_vae_decoder(vae, *, channels_last: bool = False, options: dict | None = None) -> None:
    """How the pipeline compiles the VAE decoder on CUDA (over twice as fast as eager): one static graph
    per resolution. The build does the same on a copy, so that the engine's persisted
    artefacts hold these kernels too and a fresh process skips their ~20 s of compilation.

    Sets eval mode and requires_grad=False first: whether parameters require grad is part of the
    compiled graph's cache key, so the build's copy and the pipeline's VAE must agree (inference only).
    `channels_last` (the convolution weights in NHWC) and Inductor `options` are for measuring
    variants (bench/vae_probe.py); the defaults are the measured choice (BENCHMARKS.md).
    """
    vae.eval().requires_grad_(False)
    if channels_last:
        vae.decoder.to(memory_format=torch.channels_last)
    vae.decoder.compile(fullgraph=False, dynamic=False, options=options)


def compile_vae_encoder(vae) -> None:
    """The VAE encoder (image to image, inpainting, ControlNet inputs) as the decoder is compiled: one
    static graph per resolution, here in channels-last memory (its convolutions' weights, and the images
    runtime/image_input.py hands it); compiled lazily, so text to image pays nothing for it."""
    vae.eval().requires_grad_(False)
    vae.encoder.to(memory_format=torch.channels_last)
    vae.encoder.compile(fullgraph=False, dynamic=False)


@torch.no_grad()
def warm_up_vae_decoder(vae, shapes, progress=None, encoder: bool = False) -> None:
    """Decode (and with `encoder`, encode) once at each (resolution, batch) so the compiled kernels exist
    now (the build keeps them with the engine's artefacts)."""
    for shape in shapes:
        res = Resolution.parse(shape.resolution)
        for batch in sorted({1, shape.batch}):
            latents = torch.randn(res.latent_shape(batch), device=vae.device, dtype=vae.dtype)
            vae.decode(latents, return_dict=False)
            if encoder:
                pixels = torch.rand(batch, 3, res.height, res.width, device=vae.device, dtype=vae.dtype) * 2 - 1
                vae.encode(pixels.contiguous(memory_format=torch.channels_last))
        if progress is not None:
            progress.update()


def save_artifacts() -> bytes:
    """The compile caches of everything compiled so far in this process."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing: no graph was compiled")
    data, _info = result
    return data


def load_artifacts(data: bytes) -> None:
    torch.compiler.load_cache_artifacts(data)
