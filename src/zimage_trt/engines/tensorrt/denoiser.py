"""A TensorRT (or TensorRT-RTX) engine behind the runtime's DenoiserEngine interface.

TensorRT engines hold one fixed-shape profile per (resolution, batch, caption capacity): captions are
padded to the profile's capacity and the engine masks each item's rows past its own padded length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...model.shapes import padded_caption_length
from .. import contract
from ..base import DenoiserEngine
from ..manifest import Manifest
from .runtime import TensorRTEngine


def runtime_cache_path(engine_path: Path, device) -> Path | None:
    """Beside the engine, one per GPU generation (TensorRT-RTX compiles its kernels per GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return engine_path.with_name(f"{engine_path.name}.sm{major}{minor}.runtime-cache")


class TensorRTDenoiserEngine(DenoiserEngine):
    def __init__(self, path, manifest: Manifest, device):
        path = Path(path)
        self.trt = TensorRTEngine(path, flavor=manifest.backend, device=device,
                                  runtime_cache_path=runtime_cache_path(path, device))
        super().__init__(self.trt.device, self.trt.dtypes[contract.CAPTION_FEATURES])  # already a torch dtype
        self.kind = manifest.backend
        self.shapes = manifest.shapes
        # Capturable only where the library says so for a context of this engine (TensorRT-RTX's
        # is_stream_capturable; full TensorRT has no such query and is capturable after a warm-up).
        self.supports_cuda_graph = (self.device.type == "cuda"
                                    and self.trt.stream_capturable(torch.cuda.Stream(self.device)))

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
