"""The GPU denoising loop: one persistent stream, buffers allocated once per shape, the Euler update
on the GPU, a CUDA graph over each step, and no host synchronisation until the loop ends.

The sigma schedule and timesteps come from diffusers' `FlowMatchEulerDiscreteScheduler` (computed by
the pipeline); this loop only applies its update, `x <- x + (sigma_next - sigma) * model_output`, in
fp32 exactly as `FlowMatchEulerDiscreteScheduler.step` does, so that it can live inside the graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..engines import contract
from ..engines.base import DenoiserEngine
from ..model.shapes import Resolution, padded_caption_length


@dataclass
class StepSlot:
    """Static buffers (and the captured graph) for one (batch, latent shape, caption layout)."""

    latents: torch.Tensor  # [B, 16, h, w] fp32, updated in place each step
    timestep: torch.Tensor  # [B_model] fp32 model timestep (1000 - t) / 1000
    dt: torch.Tensor  # [] fp32 sigma_next - sigma
    guidance: torch.Tensor  # [] fp32 guidance scale (used only when cfg)
    cap_feats: torch.Tensor  # [B_model, C, F] engine dtype
    cap_lens: torch.Tensor  # [B_model] int64
    cfg: bool
    normalization: float
    masked: bool
    graph: torch.cuda.CUDAGraph | None = None


class DenoiseLoop:
    """Runs the whole denoising loop for a batch; reuses buffers and graphs across calls."""

    def __init__(self, engine: DenoiserEngine, device=None, *, use_cuda_graph: bool = True, stream_priority: int = 0):
        self.engine = engine
        self.device = torch.device(device) if device is not None else engine.device
        self.on_cuda = self.device.type == "cuda"
        self.use_cuda_graph = bool(use_cuda_graph and self.on_cuda and engine.supports_cuda_graph)
        # One stream for the pipeline's whole life: work is ordered on it and never on the default stream.
        # A negative priority asks the GPU to schedule our kernels ahead of other streams' (a noisy
        # neighbour in this process; other processes only through time-slicing).
        self.stream = torch.cuda.Stream(self.device, priority=stream_priority) if self.on_cuda else None
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self._slots: dict[tuple, StepSlot] = {}
        self.last_step_times_ms: list[float] = []
        # An engine whose memory our captured graphs point into (TensorRT) drops them before it closes
        # or refits: a graph replayed over freed or moved buffers would read garbage, not fail.
        add_release_hook = getattr(engine, "add_release_hook", None)
        if add_release_hook is not None:
            add_release_hook(self.discard_slots)

    # -- buffers -----------------------------------------------------------------------------
    def _slot(self, latents, feats_dim, capacity, model_batch, cfg, normalization, masked) -> StepSlot:
        key = (tuple(latents.shape), feats_dim, capacity, model_batch, cfg, float(normalization), masked)
        slot = self._slots.get(key)
        if slot is None:
            dev = self.device
            inputs = contract.input_dtypes(self.engine.dtype)  # the engine's inputs; latents stay fp32 here
            slot = StepSlot(
                latents=torch.empty(latents.shape, dtype=torch.float32, device=dev),
                timestep=torch.empty(model_batch, dtype=inputs[contract.TIMESTEP], device=dev),
                dt=torch.empty((), dtype=torch.float32, device=dev),
                guidance=torch.empty((), dtype=torch.float32, device=dev),
                cap_feats=torch.zeros(model_batch, capacity, feats_dim, dtype=inputs[contract.CAPTION_FEATURES], device=dev),
                cap_lens=torch.empty(model_batch, dtype=inputs[contract.CAPTION_LENGTHS], device=dev),
                cfg=cfg,
                normalization=float(normalization),
                masked=masked,
            )
            self._slots[key] = slot
        return slot

    def discard_slots(self, latent_shape=None) -> int:
        """Drop the buffers and captured graphs for `latent_shape` (every shape when None); returns how many.

        For after a failure (e.g. out of memory) that may have stopped a step or a graph capture half
        way: the next call of that shape allocates and captures afresh. Other shapes are untouched.
        """
        keys = [key for key in self._slots if latent_shape is None or key[0] == tuple(latent_shape)]
        for key in keys:
            del self._slots[key]
        return len(keys)

    def buffer_pointers(self) -> list[tuple[int, ...]]:
        """Device addresses of every persistent buffer (tests check they stay put across calls)."""
        return [
            tuple(t.data_ptr() for t in (s.latents, s.timestep, s.dt, s.guidance, s.cap_feats, s.cap_lens))
            for s in self._slots.values()
        ]

    # -- one step (what the graph holds) -----------------------------------------------------
    def _step(self, slot: StepSlot) -> None:
        model_in = torch.cat([slot.latents, slot.latents]) if slot.cfg else slot.latents
        out = self.engine.run(model_in, slot.timestep, slot.cap_feats, slot.cap_lens, slot.masked)
        if slot.cfg:
            pos, neg = out.chunk(2)
            pred = pos + slot.guidance * (pos - neg)
            if slot.normalization > 0:
                # diffusers' cfg_normalization: cap each item's norm at normalization * |pos|, per item.
                pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
                new_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
                max_norm = pos_norm * slot.normalization
                factor = torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm))
                pred = torch.where((new_norm > max_norm)[:, None, None, None], pred * factor[:, None, None, None], pred)
        else:
            pred = out
        # FlowMatchEulerDiscreteScheduler.step with the pipeline's `noise_pred = -model_output`.
        slot.latents.copy_(slot.latents + slot.dt * (-pred))

    def _run_step(self, slot: StepSlot) -> None:
        if not self.use_cuda_graph:
            self._step(slot)
            return
        if slot.graph is None:
            # Warm up on our stream (the first run compiles and allocates), undo its update, then capture
            # one step: capture records kernels without running them, so replay does this step for real.
            snapshot = slot.latents.clone()
            self._step(slot)
            slot.latents.copy_(snapshot)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=self.stream, capture_error_mode="thread_local"):
                self._step(slot)
            slot.graph = graph
        slot.graph.replay()

    # -- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: list[torch.Tensor],
        negative_prompt_embeds: list[torch.Tensor] | None,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        guidance_scale: float | Callable[[], float] = 0.0,
        cfg_normalization: float | bool = False,
        cfg_truncation: float = 1.0,
        callback=None,
        progress: bool = True,
    ) -> torch.Tensor:
        # A callable guidance is read before every step (a step callback may change it, as in diffusers);
        # whether CFG runs at all is decided by its value at the start (the negative prompts exist or not).
        dynamic_guidance = callable(guidance_scale)
        guidance_now = guidance_scale if dynamic_guidance else (lambda: guidance_scale)
        guidance_scale = guidance_now()
        batch = latents.shape[0]
        if len(prompt_embeds) != batch:
            raise ValueError(f"got {len(prompt_embeds)} prompt embeddings for {batch} latents; they must match")
        do_cfg = guidance_scale > 0
        if do_cfg and (negative_prompt_embeds is None or len(negative_prompt_embeds) != batch):
            raise ValueError("guidance_scale > 0 needs one negative prompt embedding per image")
        steps = len(timesteps)
        # diffusers turns CFG off for steps whose normalised time exceeds cfg_truncation.
        t_norms = ((1000 - timesteps.float()) / 1000).tolist()
        cfg_on = [do_cfg and not (cfg_truncation is not None and cfg_truncation <= 1 and t_norms[i] > cfg_truncation) for i in range(steps)]
        normalization = float(cfg_normalization) if cfg_normalization else 0.0

        stream_ctx = torch.cuda.stream(self.stream) if self.on_cuda else contextlib.nullcontext()
        with stream_ctx:
            if self.on_cuda:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            dev = self.device
            model_t = ((1000 - timesteps.to(dev, torch.float32)) / 1000).contiguous()
            sig = sigmas.to(dev, torch.float32)
            dts = (sig[1:] - sig[:-1]).contiguous()
            current = latents.to(dev, torch.float32)
            events = []
            bar = tqdm(total=steps, desc="denoising", disable=not progress, leave=False)
            slot = None
            for i in range(steps):
                embeds = prompt_embeds + negative_prompt_embeds if cfg_on[i] else prompt_embeds
                lengths = [int(e.shape[0]) for e in embeds]
                capacity, masked = self.engine.caption_layout(lengths, Resolution.of_latents(latents).key, len(embeds))
                new_slot = self._slot(current, embeds[0].shape[-1], capacity, len(embeds), cfg_on[i], normalization, masked)
                if new_slot is not slot:
                    # Entering a slot: move the running latents and this step's captions into its buffers.
                    new_slot.latents.copy_(current)
                    _fill_captions(new_slot, embeds, lengths)
                if new_slot is not slot or dynamic_guidance:
                    new_slot.guidance.fill_(float(guidance_now()))
                slot = new_slot
                slot.timestep.copy_(model_t[i].expand(len(embeds)))
                slot.dt.copy_(dts[i])
                if self.on_cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(self.stream)
                self._run_step(slot)
                if self.on_cuda:
                    end.record(self.stream)
                    events.append((start, end))
                current = slot.latents
                if callback is not None:
                    replaced = callback(i, timesteps[i], slot.latents)
                    if replaced is not None and replaced is not slot.latents:
                        slot.latents.copy_(replaced)
                bar.update()
            bar.close()
            result = current.clone()
        if self.on_cuda:
            self.stream.synchronize()  # the one host sync of the loop
            self.last_step_times_ms = [s.elapsed_time(e) for s, e in events]
        else:
            self.last_step_times_ms = []
        return result


def _fill_captions(slot: StepSlot, embeds: list[torch.Tensor], lengths: list[int]) -> None:
    capacity = slot.cap_feats.shape[1]
    for row, (embed, length) in enumerate(zip(embeds, lengths)):
        if length > capacity or padded_caption_length(length) > capacity:
            raise ValueError(f"caption of {length} tokens does not fit the engine's caption capacity {capacity}")
        slot.cap_feats[row, :length].copy_(embed, non_blocking=True)
        slot.cap_feats[row, length:].zero_()
    slot.cap_lens.copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=True)
