"""A TensorRT (or TensorRT-RTX) engine behind the runtime's DenoiserEngine interface.

TensorRT engines hold one fixed-shape profile per (resolution, batch, caption capacity): captions are
padded to the profile's capacity and the engine masks each item's rows past its own padded length. A
call for fewer items than any profile of that resolution holds (CFG switched off by `cfg_truncation`
on an engine built for the CFG batch 2B) runs in the smallest larger profile, the extra rows filled
with copies of the last item and dropped from the output.

A ControlNet-ready engine (built with `--controlnet` / `build_engines(..., controlnet=...)`) has one more
input, `controlnet_hints`, bound like the others into its persistent buffer (so a step with hints is
capturable as it is); a text-to-image call on it zeroes that buffer (one memset a step: selection prefers
a plain engine for text-to-image).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...model.shapes import Resolution, padded_caption_length
from .. import contract
from ..base import DenoiserEngine
from ..manifest import EngineShape, Manifest
from . import refit
from .library import TensorRTBackendError
from .runtime import TensorRTEngine


def runtime_cache_path(engine_path: Path, device) -> Path | None:
    """Beside the engine, one per GPU generation (TensorRT-RTX compiles its kernels per GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return engine_path.with_name(f"{engine_path.name}.sm{major}{minor}.runtime-cache")


# What to build instead, named wherever a plain engine is asked for hints or its places differ.
BUILD_OPTION = ("zimage-trt build --controlnet PATH (or --controlnet-places 0,2,...); "
                "build_engines(..., controlnet=...) from Python")


def check_engine_against_manifest(engine: TensorRTEngine, manifest: Manifest) -> None:
    """The engine's I/O names, dtypes and profiles are the contract's and its manifest's (the plain or the
    ControlNet-ready variant, as the manifest says); else a clear error."""
    where = f"engine {engine.source} ({manifest.name})"
    controlnet = bool(manifest.controlnet_places)
    names = contract.CONTROLNET_INPUT_NAMES if controlnet else contract.INPUT_NAMES
    if tuple(engine.input_names) != names or tuple(engine.output_names) != contract.OUTPUT_NAMES:
        variant = f"ControlNet-ready (places {manifest.controlnet_places})" if controlnet else "plain"
        raise TensorRTBackendError(
            f"{where} has inputs {engine.input_names} and outputs {engine.output_names}; its manifest says {variant}, "
            f"whose contract is {list(names)} -> {list(contract.OUTPUT_NAMES)}: rebuild it with `zimage-trt build`")
    feature_dtype = engine.dtypes[contract.CAPTION_FEATURES]
    expected = {**contract.input_dtypes(feature_dtype, controlnet=controlnet), contract.NOISE_PRED: torch.float32}
    wrong = {n: (str(engine.dtypes[n]), str(d)) for n, d in expected.items() if engine.dtypes[n] != d}
    if wrong:
        raise TensorRTBackendError(f"{where}: dtypes differ from the contract (name: (engine, contract)): {wrong}")
    caption_dim = engine.profiles[0][contract.CAPTION_FEATURES][-1] if engine.num_profiles else 0
    for index, shape in enumerate(manifest.shapes):
        want = contract.input_shapes(shape.batch, Resolution.parse(shape.resolution).latent_hw,
                                     shape.caption_capacity, caption_dim)
        if controlnet:
            want[contract.CONTROLNET_HINTS] = tuple(manifest.controlnet_hint_shapes[index])
        engine.find_profile(want)  # raises ProfileError naming what was built
    if manifest.refittable and not engine.refittable:
        raise TensorRTBackendError(f"{where}: the manifest says refittable but the engine is not; rebuild it")


class TensorRTDenoiserEngine(DenoiserEngine):
    holds_own_weights = True  # the plan carries its own copy of the weights: updates go through a refit

    def __init__(self, path, manifest: Manifest, device, *, trt_engine: TensorRTEngine | None = None):
        path = Path(path)
        opened_here = trt_engine is None
        if opened_here:
            trt_engine = TensorRTEngine(path, flavor=manifest.backend, device=device,
                                        runtime_cache_path=runtime_cache_path(path, device))
        try:
            self._take(trt_engine, manifest)
        except BaseException:
            if opened_here:  # refused (or failed) before anyone else holds it: give its GPU memory back
                trt_engine.close()
            raise

    def _take(self, trt_engine: TensorRTEngine, manifest: Manifest) -> None:
        check_engine_against_manifest(trt_engine, manifest)
        self.trt = trt_engine
        super().__init__(trt_engine.device, trt_engine.dtypes[contract.CAPTION_FEATURES])
        self.kind = manifest.backend
        self.manifest = manifest
        self.shapes = manifest.shapes
        # The ControlNet-ready variant: the main layers its hints follow, in hint order, and their width.
        self.control_places = tuple(manifest.controlnet_places)
        self.takes_controlnet_hints = bool(self.control_places)
        self.hint_dim = manifest.controlnet_hint_shapes[0][-1] if self.control_places else None
        # Capturable only where the library says so for a context of this engine (TensorRT-RTX's
        # is_stream_capturable; full TensorRT has no such query and is capturable after a warm-up).
        self.supports_cuda_graph = (self.device.type == "cuda"
                                    and trt_engine.stream_capturable(torch.cuda.Stream(self.device)))

    def _profile(self, resolution_key: str, batch: int, need: int) -> EngineShape | None:
        """The exact batch if built, else the smallest larger one (rows padded); then the smallest capacity."""
        fits = [s for s in self.shapes
                if s.resolution == resolution_key and s.batch >= batch and s.caption_capacity >= need]
        return min(fits, key=lambda s: (s.batch, s.caption_capacity), default=None)

    def caption_layout(self, caption_lengths, resolution_key, batch):
        need = max(padded_caption_length(n) for n in caption_lengths)
        shape = self._profile(resolution_key, batch, need)
        if shape is None:
            built = ", ".join(f"{s.resolution} batch {s.batch} captions {s.caption_capacity}" for s in self.shapes)
            raise ValueError(
                f"this {self.kind} engine has no profile for {resolution_key} batch {batch} (or larger) with a "
                f"{need}-row caption (built: {built}); rebuild with that shape"
            )
        return shape.caption_capacity, True

    takes_controlnet_hints = False  # (a plain engine's network has no hint input; set per engine above)

    def run(self, latents, timestep, cap_feats, cap_lens, masked: bool, controlnet_hints=None) -> torch.Tensor:
        if controlnet_hints is not None and not self.control_places:
            raise ValueError(f"this {self.kind} engine ({self.manifest.name}) was built without ControlNet inputs, so "
                             f"it cannot take controlnet_hints; build the ControlNet-ready variant: {BUILD_OPTION}")
        batch, capacity = latents.shape[0], cap_feats.shape[1]
        resolution_key = Resolution.of_latents(latents).key
        shape = self._profile(resolution_key, batch, capacity)
        if shape is None or shape.caption_capacity != capacity:
            raise ValueError(f"no profile of this {self.kind} engine takes {resolution_key} batch {batch} with "
                             f"caption capacity {capacity}; ask caption_layout() for the capacity first")
        latent_hw = tuple(latents.shape[-2:])
        if self.control_places:
            shapes = contract.controlnet_input_shapes(len(self.control_places), shape.batch, latent_hw, capacity,
                                                      cap_feats.shape[-1], self.hint_dim, channels=latents.shape[1])
        else:
            shapes = contract.input_shapes(shape.batch, latent_hw, capacity, cap_feats.shape[-1],
                                           channels=latents.shape[1])
        if controlnet_hints is not None:
            want = contract.hint_shape(len(self.control_places), batch, latent_hw, capacity, self.hint_dim)
            if tuple(controlnet_hints.shape) != want:
                raise ValueError(f"controlnet_hints has shape {tuple(controlnet_hints.shape)}, this engine takes {want} "
                                 f"(places {list(self.control_places)}, batch, image tokens padded to 32 + caption "
                                 f"capacity, model dim)")
        buffers = self.trt.select(shapes).inputs
        # Straight into the engine's persistent inputs (no allocation, so this is capturable as it is).
        for name, tensor in contract.as_feed((latents, timestep, cap_feats, cap_lens)).items():
            buf = buffers[name]
            buf[:batch].copy_(tensor, non_blocking=True)
            if shape.batch > batch:
                buf[batch:].copy_(tensor[-1:].expand_as(buf[batch:]), non_blocking=True)
        if self.control_places:
            hints = buffers[contract.CONTROLNET_HINTS]  # [P, B, S, D]: the batch is its second axis
            if controlnet_hints is None:
                hints.zero_()  # text-to-image on this engine (every call: a captured graph must replay it)
            else:
                hints[:, :batch].copy_(controlnet_hints, non_blocking=True)
                if shape.batch > batch:
                    hints[:, batch:].copy_(controlnet_hints[:, -1:].expand_as(hints[:, batch:]), non_blocking=True)
        outputs = self.trt.infer(buffers)
        return outputs[contract.NOISE_PRED][:batch]

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Refit the named transformer weights (diffusers state-dict names) into the engine, in place; CUDA
        graphs captured over it are released (recaptured at the next step) in case the weights moved."""
        if refit.refit_engine(self.trt, self.manifest, weights):
            self.trt.release_graphs()

    def add_release_hook(self, release) -> None:
        """``release()`` drops CUDA graphs captured over this engine; :meth:`close` calls it first."""
        self.trt.add_release_hook(release)

    def close(self) -> None:
        self.trt.close()
