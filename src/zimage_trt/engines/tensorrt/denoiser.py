"""A TensorRT (or TensorRT-RTX) engine behind the runtime's DenoiserEngine interface.

TensorRT engines hold one fixed-shape profile per (resolution, batch, caption capacity): captions are
padded to the profile's capacity and the engine masks each item's rows past its own padded length.
"""

from __future__ import annotations

import torch

from ...model.shapes import padded_caption_length
from .. import contract
from ..base import DenoiserEngine
from ..manifest import Manifest
from .runtime import TensorRTEngine


class TensorRTDenoiserEngine(DenoiserEngine):
    supports_cuda_graph = True  # execute_async_v3 on fixed shapes is capturable

    def __init__(self, path, manifest: Manifest, device):
        self.trt = TensorRTEngine(path, flavor=manifest.backend, device=device)
        super().__init__(self.trt.device, self.trt.dtypes[contract.CAPTION_FEATURES])  # already a torch dtype
        self.kind = manifest.backend
        self.shapes = manifest.shapes

    def caption_layout(self, caption_lengths, resolution_key, batch):
        need = max(padded_caption_length(n) for n in caption_lengths)
        fits = sorted(s.caption_capacity for s in self.shapes
                      if s.resolution == resolution_key and s.batch == batch and s.caption_capacity >= need)
        if not fits:
            built = ", ".join(f"{s.resolution} batch {s.batch} captions {s.caption_capacity}" for s in self.shapes)
            raise ValueError(
                f"this {self.kind} engine has no profile for {resolution_key} batch {batch} with a {need}-row "
                f"caption (built: {built}); rebuild with that shape"
            )
        return fits[0], True

    def run(self, latents, timestep, cap_feats, cap_lens, masked: bool) -> torch.Tensor:
        inputs = contract.as_feed((latents, timestep, cap_feats, cap_lens))
        outputs = self.trt.infer(inputs, stream=torch.cuda.current_stream(self.device))
        return outputs[contract.NOISE_PRED]
