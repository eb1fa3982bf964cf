"""A request in the service (`Job`), and the pipeline's step callback for one of its images: it stops an
aborted request at the next step, times the step and sends its event, and makes the request's partial
images (previews.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .outcome import b64, encode_image
from .previews import LatentPreviewer, PreviewBudget, predicted_x0, preview_steps
from .family import TaskImages
from .schema import ImageRequest, StreamEvent


@dataclass
class Job:
    """A request in the service: what it asks, where it stands, what it took (service.py)."""

    request: ImageRequest
    request_id: str
    seeds: list[int]
    estimate_ms: float
    task: str = "text-to-image"  # family.py's task name
    images: TaskImages | None = None
    steps: int = 0  # denoising steps each image runs (fewer than asked with an edit's strength)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    image_index: int = 0
    step: int = 0
    abort_reason: str | None = None  # "timeout" | "shutdown" | "disconnected"
    future: Any = None
    listeners: list = field(default_factory=list)  # (loop, asyncio.Queue) of streaming clients
    progress: bool = False  # a client follows every step (?stream=true): the worker syncs each step
    step_ms: list = field(default_factory=list)
    timings: list = field(default_factory=list)  # one pipeline Timings per image
    gpu_seen: dict | None = None  # what the GPU monitor saw while the request ran
    prompt_tokens: int = 0  # for OpenAI's usage: counted on the worker, the one thread using the tokenizer
    preview_ms: float = 0.0  # time the worker spent on partial images (previews.py), all images
    previews: int = 0
    previews_skipped: int = 0  # over the budget

    def emit(self, event: StreamEvent) -> None:
        for loop, queue in list(self.listeners):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the client's loop is closed: nobody listens any more
                pass


class Aborted(Exception):
    """Raised from the step callback to stop a running request (time-out, shutdown, client gone)."""


class StepCallback:
    """`callback_on_step_end` for one image of `job`. `read_latents`: the pipeline hands over each step's
    latents (for previews, and for `final`, the last step's, which teach the previewer)."""

    def __init__(self, job, pipe, previewer: LatentPreviewer, png_compress_level: int, read_latents: bool):
        self.job, self.previewer, self.png_compress_level = job, previewer, png_compress_level
        self.device = getattr(pipe, "device", torch.device("cpu"))
        self.read_latents = read_latents
        self.steps = job.steps  # the steps this image runs (an edit's strength skips the first ones)
        self.skipped = job.request.num_inference_steps - job.steps  # the schedule's steps before them
        self.when = set(preview_steps(self.steps, job.request.previews))
        self.budget = PreviewBudget(previewer.cost_estimate_s)
        self.previous = None
        self.final = None
        self.last = time.perf_counter()

    def __call__(self, pipe, index, timestep, tensors):
        job = self.job
        if job.abort_reason is not None:
            raise Aborted(job.abort_reason)
        if job.progress and self.device.type == "cuda":
            # Only for a client that follows the steps: they are otherwise queued ahead asynchronously,
            # and the events would all arrive when the image is done. One sync a step costs microseconds.
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        ms = (now - self.last) * 1000.0
        self.last = now
        job.step = index + 1
        job.step_ms.append(ms)
        job.emit(StreamEvent("step", {"image": job.image_index, "step": index + 1, "steps": self.steps,
                                      "ms": round(ms, 3)}))
        latents = tensors.get("latents") if self.read_latents else None
        if latents is not None:
            if index in self.when and self.previous is not None:
                if self.budget.allows():
                    self._preview(pipe, index, latents)
                else:
                    job.previews_skipped += 1
            self.previous = latents  # (a copy the pipeline made for the callback: safe to keep)
            if index == self.steps - 1:
                self.final = latents
        return {}

    def _preview(self, pipe, index: int, latents) -> None:
        """One partial image: x0 after step `index`, through the previewer, in the request's format."""
        started = time.perf_counter()
        # This call's whole schedule: the latents after the run's step i are at sigma skipped + i + 1.
        sigmas, at = pipe.scheduler.sigmas, self.skipped + index
        x0 = predicted_x0(latents, self.previous, float(sigmas[at + 1]), float(sigmas[at]))
        req, job = self.job.request, self.job
        data = b64(encode_image(self.previewer.render(x0), req.image_format, req.compression, self.png_compress_level))
        spent = time.perf_counter() - started
        self.budget.spend(spent)
        self.previewer.cost_estimate_s = spent
        job.preview_ms += spent * 1000.0
        job.previews += 1
        job.emit(StreamEvent("partial_image", {"image": job.image_index, "partial_image_index": self.budget.made - 1,
                                               "step": index + 1, "b64_json": data}))
