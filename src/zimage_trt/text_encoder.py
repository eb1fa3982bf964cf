"""The text encoder's forward, replayed from a CUDA graph per input shape.

Qwen3-4B on a 512-token prompt is ~4 TFLOP, a few ms of GPU work, but eager PyTorch launches ~500
kernels for it and the GPU waits on Python: 36.8 ms (CV 7%) eager against 15.1 ms (CV 0.2%) replayed
from a graph, bitwise the same features (bench/stage_probe.py, H100, 2026-11-25). diffusers pads every
prompt to 512 tokens, so one graph per batch size serves every prompt.

transformers builds the attention mask with host-side checks, except while a CUDA stream is being
captured (`is_tracing` covers capture), when it always builds the explicit mask: the same mask it
builds eagerly for a padded prompt, hence the same kernels and bitwise equal features.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

# Distinct (batch, tokens) shapes kept captured; the oldest is dropped past this (each holds its
# activations, ~0.2 GiB at 512 tokens).
MAX_GRAPHS = 8


class TextEncoderRunner:
    """`hidden_states(input_ids, mask)` -> the encoder's second-to-last hidden states [B, L, F].

    On CUDA with `use_cuda_graph`, each (batch, length) is run once eagerly (lazy initialisation),
    captured, then replayed. The returned tensor is the graph's static output: it is overwritten by
    the next replay, so callers copy what they keep before calling again (the pipeline does, under its
    lock). A capture that fails turns graphs off with a warning; the eager path always works.
    """

    def __init__(self, text_encoder, device: torch.device, use_cuda_graph: bool = True):
        self.text_encoder = text_encoder
        self.device = device
        self.use_cuda_graph = bool(use_cuda_graph and device.type == "cuda")
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        # One memory pool for all captured shapes: graphs replay one at a time and each output is
        # consumed before the next replay, so their activations may share memory.
        self._pool = None

    def eager(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self.eager(input_ids, mask)
        key = (tuple(input_ids.shape), input_ids.dtype, mask.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(input_ids, mask)
            if entry is None:
                return self.eager(input_ids, mask)
            self._graphs[key] = entry
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_ids, static_mask, static_out = entry
        static_ids.copy_(input_ids)
        static_mask.copy_(mask)
        graph.replay()
        return static_out

    def _capture(self, input_ids: torch.Tensor, mask: torch.Tensor):
        static_ids, static_mask = input_ids.clone(), mask.clone()
        # Lazy initialisation (cuBLAS handles, workspaces) must happen outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.eager(static_ids, static_mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self.eager(static_ids, static_mask)
        except torch.OutOfMemoryError:
            raise  # the pipeline's out-of-memory handling takes it from here; graphs stay on
        except Exception as error:  # a model with host syncs in its forward cannot be captured
            self.use_cuda_graph = False
            self._graphs.clear()
            warnings.warn(f"the text encoder cannot run in a CUDA graph ({type(error).__name__}: {error}); "
                          "running it eagerly", stacklevel=3)
            return None
        return graph, static_ids, static_mask, static_out

    def clear(self) -> int:
        """Drop every captured graph (after an out-of-memory error, say); returns how many."""
        count = len(self._graphs)
        self._graphs.clear()
        return count


def quantize_text_encoder_fp8(text_encoder: nn.Module) -> int:
    """Swap every linear layer of the text encoder for an FP8 one (e4m3 weights, one scale per output
    row; activations quantised per token), in place; embeddings, norms and attention stay bf16.

    For Qwen3-4B that is 3.6 of its 4.0 B parameters: 7.5 -> 4.1 GiB on the GPU, what lets the FP8
    pipeline fit 16 GB. The features move by about what the denoiser's FP8 moves its output (tested
    on the tiny model). Returns how many layers were swapped.
    """
    from .denoiser import Fp8Linear

    dtypes = {p.dtype for p in text_encoder.parameters() if p.is_floating_point()}
    if dtypes != {torch.bfloat16}:
        raise ValueError(f"an FP8 text encoder keeps its other parts in bfloat16; this one is {sorted(map(str, dtypes))}: "
                         "load it with torch_dtype=torch.bfloat16")
    # (parent, name) only: holding the old layers themselves would keep every 16-bit weight alive until
    # the end, doubling the peak memory of the conversion.
    swaps = [(parent, name) for parent in text_encoder.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name in swaps:
        setattr(parent, name, Fp8Linear(getattr(parent, name)))
    return len(swaps)
