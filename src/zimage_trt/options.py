"""`PipelineOptions`: how a `ZImageTRTPipeline` runs, gathered and checked in one place.

`from_pretrained`, `from_components` and the constructor all take these as keyword arguments and pass
them on as one object, so a new option is written once, here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .model.attention import BACKENDS as ATTENTION_BACKENDS
from .model.precision import check_precision, precision_dtype, run_precision
from .runtime.placement import default_dtype, resolve_device


@dataclass
class PipelineOptions:
    engine_dir: str | None = None  # built engines; None runs the eager static denoiser (tests, the demo)
    device: torch.device | str | None = None  # default: "cuda" when available, else "cpu"
    # default (RUN_PRECISION_RULE, as `generate` and `serve`): with engine_dir, the dtype of the precision
    # `zimage-trt build` makes by default (fp16 on a GPU), so default builds are found by default; without
    # engines, bf16 on CUDA (Z-Image's training dtype; eager torch has no fp16 overflow rescaling); fp32 on CPU.
    torch_dtype: torch.dtype | None = None
    allow_fallback: bool = False  # no fitting engine: run eager torch with a warning instead of failing
    text_encoder_device: torch.device | str | None = None  # e.g. "cpu" to save GPU memory; default: `device`
    use_cuda_graph: bool = True
    # False: the encoder runs on the prompt's tokens plus one pad token, rounded up to a multiple of 64
    # where CUDA graphs replay it (a few graphs serve all prompts): diffusers' features within rounding,
    # a fraction of the work for typical 20-150-token prompts. True: pad every prompt to
    # max_sequence_length as diffusers does (bitwise its features).
    pad_prompts_to_max_length: bool = False
    telemetry_history: int = 1000  # calls kept for `stats()`
    stream_priority: int = 0  # negative: the GPU schedules our kernels ahead of other streams'
    compile_vae: bool | None = None  # default: on CUDA
    # The engine precision to look for; None = the pipeline dtype's (fp16/bf16/fp32). "fp8" runs FP8
    # projections with bf16 elsewhere (build with --precision fp8).
    precision: str | None = None
    weights_fingerprint: str | None = None  # checked against engine manifests when known
    text_encoder_fp8: bool | None = None  # None: FP8 when precision is "fp8" on a GPU
    # The FP8 text encoder's per-token input quantisation as one Triton kernel (True) or torch ops
    # (False); None: $ZIMAGE_TRT_TEXT_FP8_KERNEL (on unless "0": measured faster). CUDA with Triton only.
    text_encoder_fp8_kernel: bool | None = None
    # Attention kernel of torch-compiled engines: None = the one the engine was built with where it runs
    # here (else SDPA); "auto" | "sdpa" | "fa3" | "fa3-fp8" (model/attention.py).
    attention_backend: str | None = None
    # > 1: this many processes (torchrun, one per GPU) make each image together (parallel/, README
    # "Several GPUs for one image"); a CUDA device without an index becomes cuda:LOCAL_RANK.
    sequence_parallel: int = 1
    sequence_parallel_timeout_s: float = 300.0  # a collective waiting longer: another rank died or hung
    # Capture steps, NCCL collectives included, in CUDA graphs: measured faster on 2 GPUs (BENCHMARKS.md,
    # sequence parallelism; FP8 1024²: 414 vs 466 ms an image), equal at 2048².
    sequence_parallel_cuda_graph: bool = True

    @classmethod
    def from_keywords(cls, options: "PipelineOptions | None" = None, **keywords) -> "PipelineOptions":
        """`options` updated with `keywords`; an unknown keyword is a TypeError that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"unknown pipeline option(s) {unknown}; the options are {sorted(known)}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **keywords).resolved()

    def _default_dtype(self, device: torch.device) -> torch.dtype:
        if self.precision is None:
            return precision_dtype(run_precision(None, device, with_engines=self.engine_dir is not None))
        return default_dtype(device)

    def resolved(self) -> "PipelineOptions":
        """Defaults filled in (a concrete device and dtype) and values checked."""
        device = self.device
        if self.sequence_parallel != 1 and torch.cuda.is_available() and str(device or "cuda") == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # torchrun: one GPU per process
        device = resolve_device(device)
        if self.precision is not None:
            check_precision(self.precision)
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS} "
                             "(None: the engine's own)")
        return dataclasses.replace(
            self,
            device=device,
            torch_dtype=self.torch_dtype or self._default_dtype(device),
            text_encoder_device=torch.device(self.text_encoder_device) if self.text_encoder_device is not None else device,
            compile_vae=device.type == "cuda" if self.compile_vae is None else bool(self.compile_vae),
            allow_fallback=bool(self.allow_fallback),
            stream_priority=int(self.stream_priority),
        )
