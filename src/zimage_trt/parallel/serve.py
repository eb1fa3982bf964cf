"""How the ranks of a sequence-parallel pipeline share each call.

Rank 0 is the pipeline the user talks to: it checks the request, encodes the prompts, draws the
noise and schedule, and decodes the image. Every rank runs the denoising loop, because every rank
computes a slice of each step. So before its loop, rank 0 sends the loop's inputs to the others:

1. on the control group (gloo, long timeout), a JSON header: the shape key, CFG, guidance settings,
   and the shapes of what follows (or `{"stop": true}` when rank 0 closes the pipeline);
2. on the data group, one float32 tensor with the initial latents, the prompt (and negative)
   embeddings, timesteps and sigmas, packed end to end.

The other ranks wait in `serve` for the next header, run the same loop on what they received, and
go back to waiting. Each rank gets every step's whole model output (all-gathered), so the Euler
updates, and the latents, stay the same everywhere. A step callback on rank 0 may replace the
latents: when there is one, rank 0 sends after it at each step a go/stop flag (control group) and,
on go, the latents (data group). A callback that raises (a served request timed out, or the service
shuts down) sends stop: every rank leaves that loop and the group stays usable for the next call.
Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import artifacts
from .denoiser import shard_engine
from .group import DEFAULT_TIMEOUT_S, ParallelGroup, SequenceParallelError, check_degree, join

log = logging.getLogger(__name__)


@dataclass
class LoopCall:
    """One denoising loop's inputs, as every rank runs it."""

    resolution: str  # Resolution.key: "WIDTHxHEIGHT"
    images: int
    cfg: bool
    latents: torch.Tensor
    positive: list[torch.Tensor]
    negative: list[torch.Tensor] | None
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    guidance_scale: float
    cfg_normalization: float | bool
    cfg_truncation: float | None
    step_sync: bool  # rank 0 has a step callback: the latents are sent after each step


def _pack(call: LoopCall, device: torch.device) -> tuple[dict, torch.Tensor]:
    tensors = [call.latents, *call.positive, *(call.negative or []), call.timesteps, call.sigmas]
    header = {
        "stop": False, "resolution": call.resolution, "images": call.images, "cfg": call.cfg,
        "latents": list(call.latents.shape), "positive": [list(e.shape) for e in call.positive],
        "negative": None if call.negative is None else [list(e.shape) for e in call.negative],
        "timesteps": call.timesteps.numel(), "sigmas": call.sigmas.numel(),
        "guidance_scale": float(call.guidance_scale), "cfg_normalization": call.cfg_normalization,
        "cfg_truncation": call.cfg_truncation, "step_sync": call.step_sync,
    }
    # (the embeddings may come from a text encoder on another device)
    return header, torch.cat([t.reshape(-1).to(device, torch.float32) for t in tensors])


def _unpack(header: dict, payload: torch.Tensor) -> LoopCall:
    offset = 0

    def take(shape) -> torch.Tensor:
        nonlocal offset
        count = _numel(shape)
        out = payload[offset:offset + count].view(*shape)
        offset += count
        return out

    latents = take(header["latents"])
    positive = [take(s) for s in header["positive"]]
    negative = None if header["negative"] is None else [take(s) for s in header["negative"]]
    timesteps, sigmas = take([header["timesteps"]]), take([header["sigmas"]])
    return LoopCall(header["resolution"], header["images"], header["cfg"], latents, positive, negative, timesteps,
                    sigmas, header["guidance_scale"], header["cfg_normalization"], header["cfg_truncation"],
                    header["step_sync"])


def start(transformer, degree: int, device: torch.device, *, timeout_s: float = DEFAULT_TIMEOUT_S,
          cuda_graph: bool = False, engine_dir=None) -> "Coordinator":
    """Check `degree` against the model's heads, then join the process group (one process per GPU).

    With an engine folder, the sequence-parallel kernels compiled by an earlier run are loaded from it
    (and rank 0 keeps those of each new shape there)."""
    check_degree(degree, int(transformer.config.n_heads))
    coordinator = Coordinator(join(degree, device, timeout_s=timeout_s), cuda_graph=cuda_graph, engine_dir=engine_dir)
    coordinator.kept_shapes.update(artifacts.load(engine_dir, degree))
    return coordinator


class Coordinator:
    """Rank 0's side (`lead`, `stop`) and the other ranks' side (`serve`) of each call."""

    def __init__(self, group: ParallelGroup, *, cuda_graph: bool = False, engine_dir=None):
        self.group = group
        self.cuda_graph = cuda_graph
        self.engine_dir = engine_dir
        self.kept_shapes: set[str] = set()  # shapes whose compiled kernels are in engine_dir
        self.stopped = False
        self.calls_stopped = 0  # ranks other than 0: calls rank 0 stopped midway (its step callback raised)

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def shard(self, engine):
        """The engine, made to run its share of each step (idempotent)."""
        return shard_engine(engine, self.group, cuda_graph=self.cuda_graph)

    def close(self) -> None:
        """Rank 0: release the other ranks; every rank: leave the process group if we started it."""
        try:
            self.stop()
        finally:
            self.group.close()

    # -- control messages (gloo, CPU) ------------------------------------------------------------
    def _send_header(self, header: dict) -> None:
        data = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        # The control group waits long (for idle ranks), but rank 0 waits only the data group's timeout
        # for the others to take the message: a rank that is alive but not serving must not hang us.
        limit = timedelta(seconds=self.group.timeout_s)
        for tensor in (size, data):
            dist.broadcast(tensor, 0, group=self.group.control, async_op=True).wait(limit)

    def _receive_header(self) -> dict:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group.control)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.group.control)
        return json.loads(bytes(data.numpy()).decode())

    # -- rank 0 ----------------------------------------------------------------------------------
    def lead(self, loop, resolution: str, images: int, cfg: bool, step_sync: bool) -> "LeadingLoop":
        """`loop` (a DenoiseLoop) wrapped so that calling it first sends its inputs to the other ranks."""
        if self.stopped:
            raise SequenceParallelError("this sequence-parallel pipeline was closed: its other ranks have stopped")
        return LeadingLoop(self, loop, resolution, images, cfg, step_sync)

    def send(self, call: LoopCall) -> None:
        header, payload = _pack(call, self.group.device)
        with collective_errors(self.group, "sending a call's inputs to the other ranks"):
            self._send_header(header)
            dist.broadcast(payload, 0, group=self.group.data)

    def stop(self) -> None:
        """Release the other ranks from `serve` (once)."""
        if self.stopped or not self.group.is_main:
            return
        self.stopped = True
        with collective_errors(self.group, "telling the other ranks to stop"):
            self._send_header({"stop": True})

    # -- ranks other than 0 ----------------------------------------------------------------------
    def serve(self, denoise_loop: Callable) -> int:
        """Run each call rank 0 sends (`denoise_loop(resolution, images, cfg)` gives the loop) until it
        stops; returns how many calls were served (those rank 0 stopped midway included)."""
        served = 0
        while True:
            with collective_errors(self.group, "waiting for rank 0's next call"):
                header = self._receive_header()
                if header["stop"]:
                    return served
                size = sum(_numel(s) for s in [header["latents"], *header["positive"], *(header["negative"] or [])])
                payload = torch.empty(size + header["timesteps"] + header["sigmas"], dtype=torch.float32,
                                      device=self.group.device)
                dist.broadcast(payload, 0, group=self.group.data)
            call = _unpack(header, payload)
            loop = denoise_loop(call.resolution, call.images, call.cfg)
            try:
                with collective_errors(self.group, "a denoising step with the other ranks"):
                    loop(call.latents, call.positive, call.negative, call.timesteps, call.sigmas,
                         guidance_scale=call.guidance_scale, cfg_normalization=call.cfg_normalization,
                         cfg_truncation=call.cfg_truncation, callback=self._follow_latents if call.step_sync else None,
                         progress=False)
            except CallStopped:
                self.calls_stopped += 1
            served += 1

    def keep_compiled(self, engine, shape_key: str) -> None:
        """Rank 0, after a shape's first call: keep the kernels compiled for it (torch-compiled engines)."""
        if (self.group.is_main and self.engine_dir is not None and engine.kind == "torch-compiled"
                and shape_key not in self.kept_shapes):
            self.kept_shapes.add(shape_key)
            artifacts.save(self.engine_dir, self.group.degree, shape_key)

    def _follow_latents(self, index, timestep, latents: torch.Tensor) -> torch.Tensor:
        if not self.step_flag():
            raise CallStopped(f"rank 0 stopped the call after step {index + 1}")
        received = latents.clone()
        dist.broadcast(received, 0, group=self.group.data)
        return received

    # -- after each step of a call with a step callback: go on, or stop -----------------------------
    def step_flag(self, go: bool = False) -> bool:
        """Rank 0 sends `go`; the others receive it. On the control group (CPU: no GPU sync), but with the
        data group's timeout: a call in progress is not an idle wait."""
        flag = torch.tensor([1 if self.group.is_main and go else 0], dtype=torch.uint8)
        work = dist.broadcast(flag, 0, group=self.group.control, async_op=True)
        work.wait(timedelta(seconds=self.group.timeout_s))
        return bool(flag[0])


class CallStopped(Exception):
    """Ranks other than 0: rank 0's step callback raised, so this call ends here (the group goes on)."""


class LeadingLoop:
    """Rank 0's DenoiseLoop: same call signature; sends the inputs (and, with a step callback, each step's
    latents) to the other ranks, then runs its own share."""

    def __init__(self, coordinator: Coordinator, loop, resolution: str, images: int, cfg: bool, step_sync: bool):
        self.coordinator, self.loop = coordinator, loop
        self.resolution, self.images, self.cfg, self.step_sync = resolution, images, cfg, step_sync

    @property
    def last_step_times_ms(self) -> list[float]:
        return self.loop.last_step_times_ms

    def __call__(self, latents, prompt_embeds, negative_prompt_embeds, timesteps, sigmas, guidance_scale=0.0,
                 cfg_normalization=False, cfg_truncation=1.0, callback=None, progress=True, interrupted=None):
        """`interrupted` (diffusers' `pipe.interrupt`) is honoured with a step callback (`step_sync`): read
        once after each step's callback, it sends stop to the other ranks and ends rank 0's loop there too.
        Without one the other ranks cannot be told mid-call, so every step runs."""
        group = self.coordinator.group
        latents = latents.to(group.device, torch.float32)
        # A callable guidance (the pipeline's, which a step callback may change) goes out as its value now:
        # only a step callback changes it, and then the latents rank 0 computed are sent after every step.
        guidance_now = guidance_scale() if callable(guidance_scale) else guidance_scale
        self.coordinator.send(LoopCall(
            self.resolution, self.images, self.cfg, latents, list(prompt_embeds),
            None if negative_prompt_embeds is None else list(negative_prompt_embeds), timesteps.float(), sigmas.float(),
            guidance_now, cfg_normalization, cfg_truncation, self.step_sync))
        stopped = None
        if self.step_sync:
            # The flag read once per step, so that what rank 0 does and what it told the others agree.
            callback, stopped = _sending_latents(callback, self.coordinator, interrupted)
        with collective_errors(group, "a denoising step with the other ranks"):
            result = self.loop(latents, prompt_embeds, negative_prompt_embeds, timesteps, sigmas,
                               guidance_scale=guidance_scale, cfg_normalization=cfg_normalization,
                               cfg_truncation=cfg_truncation, callback=callback, progress=progress,
                               interrupted=stopped)
        batch = self.images * (2 if self.cfg else 1)
        self.coordinator.keep_compiled(self.loop.engine, f"{self.resolution}-b{batch}")
        return result


def _sending_latents(callback, coordinator: Coordinator, interrupted=None):
    """The loop's callback on rank 0 (sends go/stop and the latents after each step) and the loop's
    `interrupted`: true once `interrupted()` was true after a step's callback and stop was sent."""
    group = coordinator.group
    stop = [False]

    def on_step(index, timestep, latents):
        try:
            replaced = callback(index, timestep, latents) if callback is not None else None
        except BaseException:
            try:
                coordinator.step_flag(go=False)  # the other ranks leave this call too
            except Exception as flag_error:  # (said, but the callback's error is the one the caller gets)
                log.warning("rank 0's step callback raised at step %d; telling the other ranks to stop failed too: "
                            "%s", index, flag_error)
            raise
        if interrupted is not None and interrupted():
            stop[0] = True  # no further step here, and none on the other ranks
            coordinator.step_flag(go=False)
            return replaced
        coordinator.step_flag(go=True)
        current = (replaced if replaced is not None else latents).to(group.device, torch.float32).contiguous()
        dist.broadcast(current, 0, group=group.data)
        return replaced

    return on_step, lambda: stop[0]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class collective_errors:
    """Turns a failed or timed-out collective into a SequenceParallelError that says what happened."""

    def __init__(self, group: ParallelGroup, doing: str):
        self.group, self.doing = group, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _trace):
        if error is None or isinstance(error, SequenceParallelError):
            return False
        if isinstance(error, (RuntimeError, dist.DistError)) and _is_collective_failure(error):
            raise SequenceParallelError(
                f"rank {self.group.rank} of {self.group.degree}: {self.doing} failed; another rank died, hung or "
                f"stopped early (collectives time out after {self.group.timeout_s:.0f} s): {error}") from error
        return False


def _is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                         "broken pipe", "process group", "collective"))
