"""The GPU denoising loop: one persistent stream, buffers allocated once per shape, the Euler update
on the GPU, a CUDA graph over each step, and no host synchronisation until the loop ends.

The sigma schedule and timesteps come from diffusers' `FlowMatchEulerDiscreteScheduler` (computed by
the pipeline); this loop only applies its update, `x <- x + (sigma_next - sigma) * model_output`, in
fp32 exactly as `FlowMatchEulerDiscreteScheduler.step` does, so that it can live inside the graph.

The image tasks add to the same step, inside the same graph, from persistent buffers: the inpaint blend
(`InpaintBlend`, after the update, as diffusers' inpaint pipeline) and a ControlNet (`ControlInput`: the
engine runs it on the step's noisy latents and adds its hints inside the model). A step without them is
the plain step: no zero hints, no blend, no extra kernels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..engines import contract
from ..engines.base import DenoiserEngine, check_runs_controlnet  # noqa: F401 (check_runs_controlnet: for tasks/)
from ..model.controlnet import ControlStep
from ..model.shapes import Resolution, padded_caption_length
from .graph_capture import recover_after_failed_capture


@dataclass
class InpaintBlend:
    """diffusers' inpaint blend after every step: latents = (1 - mask) * noised + mask * latents, where
    noised = sigma_next * noise + (1 - sigma_next) * image_latents (`scheduler.scale_noise` at the next
    step's sigma) and, after the last step, the clean image latents (sigma 0)."""

    mask: torch.Tensor  # [B, 1, h, w] float32 in [0, 1], 1 = repaint
    image_latents: torch.Tensor  # [B, 16, h, w] float32
    noise: torch.Tensor  # [B, 16, h, w] float32, the noise the starting latents were made with


@dataclass
class ControlInput:
    """A ControlNet run every step on the noisy latents and `context`, its hints added inside the step."""

    controlnet: torch.nn.Module  # diffusers' ZImageControlNetModel; the engine runs its static form
    context: torch.Tensor  # [B, control_in_dim, h, w]: the encoded control image (+ mask and masked image)
    scales: torch.Tensor  # [hints] float32: one conditioning scale per control place


@dataclass
class BlendBuffers:
    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor  # [] float32: the next step's sigma (0 after the last)


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
    blend: BlendBuffers | None = None
    control: ControlStep | None = None  # its context [B_model, C, h, w] and scales are buffers too
    graph: torch.cuda.CUDAGraph | None = None
    # The ControlNet's compiled kernels for this slot handed to the engine to keep (after a loop that
    # finished: a first call cancelled midway leaves it False, and the next one that finishes keeps them).
    kernels_kept: bool = False


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
    def _slot(self, latents, feats_dim, capacity, model_batch, cfg, normalization, masked, blend=None,
              control=None) -> StepSlot:
        key = (tuple(latents.shape), feats_dim, capacity, model_batch, cfg, float(normalization), masked,
               None if blend is None else tuple(blend.mask.shape),
               None if control is None else (id(control.controlnet), tuple(control.context.shape[1:])))
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
            if blend is not None:
                slot.blend = BlendBuffers(*(torch.empty(t.shape, dtype=torch.float32, device=dev)
                                            for t in (blend.mask, blend.image_latents, blend.noise)),
                                          sigma=torch.empty((), dtype=torch.float32, device=dev))
            if control is not None:
                runner = self.engine.controlnet_runner(control.controlnet)
                slot.control = ControlStep(
                    runner, torch.empty(model_batch, *control.context.shape[1:], dtype=self.engine.dtype, device=dev),
                    torch.empty(control.scales.shape, dtype=torch.float32, device=dev))
            self._slots[key] = slot
        return slot

    def _fill_task_buffers(self, slot: StepSlot, blend, control) -> None:
        """Entering a slot: the call's mask, image latents, noise and ControlNet context into its buffers."""
        if slot.blend is not None:
            for buffer, value in zip((slot.blend.mask, slot.blend.image_latents, slot.blend.noise),
                                     (blend.mask, blend.image_latents, blend.noise)):
                buffer.copy_(value, non_blocking=True)
        if slot.control is not None:
            batch = control.context.shape[0]
            for half in range(slot.control.context.shape[0] // batch):  # CFG: the context for both halves
                slot.control.context[half * batch:(half + 1) * batch].copy_(control.context, non_blocking=True)
            slot.control.scales.copy_(control.scales, non_blocking=True)

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
        def pointers(s: StepSlot):
            tensors = [s.latents, s.timestep, s.dt, s.guidance, s.cap_feats, s.cap_lens]
            if s.blend is not None:
                tensors += [s.blend.mask, s.blend.image_latents, s.blend.noise, s.blend.sigma]
            if s.control is not None:
                tensors += [s.control.context, s.control.scales]
            return tuple(t.data_ptr() for t in tensors)

        return [pointers(s) for s in self._slots.values()]

    # -- one step (what the graph holds) -----------------------------------------------------
    def _step(self, slot: StepSlot) -> None:
        model_in = torch.cat([slot.latents, slot.latents]) if slot.cfg else slot.latents
        extra = {} if slot.control is None else {"control": slot.control}  # (plain engines never see it)
        out = self.engine.run(model_in, slot.timestep, slot.cap_feats, slot.cap_lens, slot.masked, **extra)
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
        if slot.blend is not None:
            # diffusers' inpaint pipeline, in its order: scale_noise at the next sigma, then the blend.
            b = slot.blend
            noised = b.sigma * b.noise + (1.0 - b.sigma) * b.image_latents
            slot.latents.copy_((1 - b.mask) * noised + b.mask * slot.latents)

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
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=self.stream, capture_error_mode="thread_local"):
                    self._step(slot)
            except BaseException:  # (out of memory, say: the pipeline serves the next call, its noise too)
                recover_after_failed_capture(self.device, graph)
                raise
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
        blend: InpaintBlend | None = None,
        control: ControlInput | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """The final latents. `interrupted` (diffusers' `pipe.interrupt`, which a step callback may set) is
        read on the host before every step: once it is true no further step runs, and the latents so far
        (after the last step's callback) are returned, as diffusers' loops `continue` past the remaining
        steps and still decode. Checked between steps only, so a captured graph is never left half run."""
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
            # The blend's sigma after step i: the next step's; after the last step the clean image (diffusers
            # blends with the image latents themselves there).
            blend_sigmas = torch.cat([sig[1:-1], sig.new_zeros(1)])[:steps] if blend is not None else None
            current = latents.to(dev, torch.float32)
            events = []
            used: dict[int, StepSlot] = {}  # the slots this call ran, by id
            bar = tqdm(total=steps, desc="denoising", disable=not progress, leave=False)
            slot = None
            try:
                for i in range(steps):
                    if interrupted is not None and interrupted():
                        break
                    embeds = prompt_embeds + negative_prompt_embeds if cfg_on[i] else prompt_embeds
                    lengths = [int(e.shape[0]) for e in embeds]
                    capacity, masked = self.engine.caption_layout(lengths, Resolution.of_latents(latents).key, len(embeds))
                    new_slot = self._slot(current, embeds[0].shape[-1], capacity, len(embeds), cfg_on[i], normalization,
                                          masked, blend, control)
                    if new_slot is not slot:
                        # Entering a slot: move the running latents and this step's captions into its buffers.
                        new_slot.latents.copy_(current)
                        _fill_captions(new_slot, embeds, lengths)
                        self._fill_task_buffers(new_slot, blend, control)
                    if new_slot is not slot or dynamic_guidance:
                        new_slot.guidance.fill_(float(guidance_now()))
                    slot = new_slot
                    used[id(slot)] = slot
                    slot.timestep.copy_(model_t[i].expand(len(embeds)))
                    slot.dt.copy_(dts[i])
                    if slot.blend is not None:
                        slot.blend.sigma.copy_(blend_sigmas[i])
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
            finally:
                bar.close()
            result = current.clone()
        if self.on_cuda:
            self.stream.synchronize()  # the one host sync of the loop
            self.last_step_times_ms = [s.elapsed_time(e) for s, e in events]
        else:
            self.last_step_times_ms = []
        kept = getattr(self.engine, "controlnet_kernels_compiled", None)
        if control is not None and kept is not None:
            # A ControlNet's first finished loop at a slot's shape compiled its kernels: keep them, once per slot.
            for used_slot in used.values():
                if used_slot.control is not None and not used_slot.kernels_kept:
                    kept(control.controlnet, tuple(used_slot.latents.shape), used_slot.cap_feats.shape[0])
                    used_slot.kernels_kept = True
        return result


def _fill_captions(slot: StepSlot, embeds: list[torch.Tensor], lengths: list[int]) -> None:
    capacity = slot.cap_feats.shape[1]
    for row, (embed, length) in enumerate(zip(embeds, lengths)):
        if length > capacity or padded_caption_length(length) > capacity:
            raise ValueError(f"caption of {length} tokens does not fit the engine's caption capacity {capacity}")
        slot.cap_feats[row, :length].copy_(embed, non_blocking=True)
        slot.cap_feats[row, length:].zero_()
    slot.cap_lens.copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=True)
