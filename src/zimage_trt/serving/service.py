"""`ImageService`: one pipeline, its `GenerationQueue`, and the async face the HTTP app (or a Ray
Serve replica) calls.

    service = ImageService(lambda: ZImageTRTPipeline.from_pretrained(...), ServiceSettings(...))
    service.start()                       # loads and warms every served size and task in a thread; then `ready`
    result = await service.generate(req)  # GeneratedImages: the encoded images, seeds, timings, usage
    result = await service.generate(edit, images=TaskImages(image=..., mask=...))   # an edit (family.py)
    async for event in service.stream(req): ...   # queued -> started -> step / partial_image ... -> done
    service.stats(); service.close(graceful=True)

One worker thread runs one request at a time (one GPU runs one generation fastest); the others wait
in the queue's bounded FIFO, so a full queue is refused at once (`ServiceError` 429 with a retry
estimate). A request's n images run back to back in its turn, image i with seed + i, each exactly
`pipe(prompt, ..., generator=torch.Generator(device).manual_seed(seed + i))`, where `pipe` is the task's
pipeline of the one family over the service's weights (family.py: text to image, image to image,
inpainting, and with a ControlNet its two tasks), all on the one worker. Time-outs and
shutdown cancel a waiting request outright, and stop a running one at its next denoising step.
Encoding (PNG, JPEG or WebP) happens off the worker thread, so the GPU goes on with the next request
meanwhile. A streaming request with `partial_images` gets previews of each image (previews.py: the
current x0 prediction through a latent -> RGB map, at most 5% of the image's time).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from ..engines.manifest import Manifest, find_manifests
from ..engines.select import EngineNotFound
from ..errors import GenerationOOMError, NonFiniteOutputError
from ..model.shapes import Resolution
from ..runtime.queue import GenerationQueue, QueueClosedError, QueueFullError
from ..runtime.gpu_monitor import GpuMonitor, reserved_bytes
from ..runtime.telemetry import GpuSampler, summarize
from .metrics import ServiceMetrics
from .family import PipelineFamily, TaskImages, check_strength_leaves_steps, steps_run
from .outcome import GeneratedImages, ServiceError, check_with_pipeline, encode_image, json_finite, task_summary
from .previews import LatentPreviewer
from .schema import ImageRequest, ServingLimits, StreamEvent
from .steps import Aborted as _Aborted
from .steps import Job, StepCallback

__all__ = ["ImageService", "ServiceSettings", "ServiceError"]

log = logging.getLogger("zimage_trt.serving")

WARM_PROMPT = "warm-up"


@dataclass
class ServiceSettings:
    limits: ServingLimits = field(default_factory=ServingLimits)
    max_queue: int = 32  # requests waiting (the running one excluded); more are refused with 429
    timeout_s: float = 300.0  # submit -> last image; past it the request is dropped (504)
    warm_steps: int = 2  # denoising steps of each warm-up generation (the graphs do not depend on it)
    history: int = 500  # requests kept for the dashboard's charts and the latency summaries
    png_compress_level: int = 1  # fast: the PNG is a transport, not an archive
    not_ready_when_shared: bool = False  # /readyz 503 while another process computes on the GPU
    controlnet: Any = None  # --controlnet: a folder, one .safetensors file or a loaded ZImageControlNetModel
    controlnet_config: str | None = None  # for one .safetensors file: a folder with its config.json
    control_scale: float | list = 0.75  # diffusers' controlnet_conditioning_scale (a list: one per place)


def served_sizes(engine_dir) -> list[str]:
    """Every resolution the denoiser manifests in `engine_dir` were built for (batch 1), in build order."""
    sizes: list[str] = []
    for path in find_manifests(engine_dir):
        manifest = Manifest.read(path)
        if manifest.component != "denoiser":
            continue
        for shape in manifest.shapes:
            if shape.batch == 1 and shape.resolution not in sizes:
                sizes.append(shape.resolution)
    return sizes


class ImageService:
    """One pipeline behind a bounded FIFO; `pipeline` is a pipeline or a zero-argument factory of one."""

    def __init__(self, pipeline, settings: ServiceSettings | None = None, metrics: ServiceMetrics | None = None,
                 gpu_monitor: GpuMonitor | None = None):
        self.settings = settings or ServiceSettings()
        if callable(pipeline) and not hasattr(pipeline, "submit"):
            self._factory, self.pipe = pipeline, None
        else:
            self._factory, self.pipe = None, pipeline
        self.family: PipelineFamily | None = None  # made once the pipeline is loaded
        self.limits = self.settings.limits
        self.state = "created"  # created -> loading -> warming -> ready -> stopping -> stopped | failed
        self.failure: str | None = None
        self.started_at = time.time()
        self._queue: GenerationQueue | None = None
        self._lock = threading.Lock()
        self._waiting: list[Job] = []  # the queue's FIFO, as far as we know it (for positions and ETAs)
        self._running: Job | None = None
        self._history: deque[dict] = deque(maxlen=self.settings.history)
        self._counts = dict.fromkeys(("submitted", "completed", "failed", "rejected_full", "timed_out",
                                      "cancelled_shutdown", "disconnected"), 0)
        self._last_steps: list[float] = []
        self._step_ms_estimate: float | None = None  # moving averages that drive the ETAs
        self._overhead_ms_estimate: float | None = None
        self._loader: threading.Thread | None = None
        self._ready = threading.Event()
        self._sampler: GpuSampler | None = None
        self._gpu_monitor = gpu_monitor  # default: one for the pipeline's CUDA device, made once it is loaded
        self.previewer = LatentPreviewer()
        self.metrics = metrics or ServiceMetrics()
        self.metrics.bind(self)

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self, background: bool = True) -> None:
        """Load the pipeline (if given a factory) and warm every served size; `ready` when done."""
        with self._lock:
            if self._loader is not None or self.state != "created":
                return
            self.state = "loading"
            self._loader = threading.Thread(target=self._load_and_warm, name="zimage-trt-warmup", daemon=True)
        if background:
            self._loader.start()
        else:
            self._loader.run()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.ready

    def _load_and_warm(self) -> None:
        try:
            if self.pipe is None:
                self.pipe = self._factory()
            if hasattr(self.pipe, "set_progress_bar_config"):
                self.pipe.set_progress_bar_config(disable=True)
            settings = self.settings
            self.family = PipelineFamily(self.pipe, settings.controlnet, settings.controlnet_config,
                                         settings.control_scale)
            if not self.limits.sizes and not self.limits.any_size:
                raise ValueError("no sizes to serve")
            with self._lock:
                if self.state != "loading":  # closed while loading
                    return
                self.state = "warming"
            for size in self.limits.sizes:
                if self.state != "warming":  # closed meanwhile
                    return
                self._warm(size)
            warm_text = getattr(self.pipe, "warm_up_text_encoder", None)
            if warm_text is not None:  # every prompt-length bucket's graph, so no request pays a capture
                warm_text()
            telemetry = getattr(self.pipe, "telemetry", None)
            if telemetry is not None:  # warm-up timings (compilation, graph capture) are not service latency
                telemetry.clear()
            self._sampler = GpuSampler(getattr(self.pipe, "device", None))
            self._start_gpu_monitor()
            with self._lock:
                if self.state == "warming":
                    self._queue = GenerationQueue(self._execute, max_pending=self.settings.max_queue,
                                                  name="zimage-trt-serve-worker")
                    self.state = "ready"
            log.info("ready: serving %s", ", ".join(self.limits.sizes) or "any size")
        except Exception as error:  # noqa: BLE001 - reported through /readyz and the log
            self.failure = f"{type(error).__name__}: {error}"
            self.state = "failed"
            log.exception("loading or warming the pipeline failed")
        finally:
            self._ready.set()

    def _warm(self, size: str) -> None:
        resolution = Resolution.parse(size)
        started = time.perf_counter()
        final = []  # the last step's latents: with the image, they teach the previewer this VAE's colours
        steps = self.settings.warm_steps

        def keep_last(pipe, index, timestep, tensors):
            if index == steps - 1:
                final.append(tensors["latents"])
            return {}

        out = self.pipe(WARM_PROMPT, height=resolution.height, width=resolution.width, num_inference_steps=steps,
                        generator=torch.Generator(self.pipe.device).manual_seed(0), callback_on_step_end=keep_last,
                        callback_on_step_end_tensor_inputs=["latents"])
        self._learn(out.timings)
        if final:
            self.previewer.observe(final[0], out.images[0])
        self.family.warm(resolution.height, resolution.width, steps, WARM_PROMPT)
        log.info("warmed %s (%s) in %.0f ms", size, ", ".join(self.family.tasks), (time.perf_counter() - started) * 1000.0)

    def mark_failed(self, reason: str) -> bool:
        """The pipeline cannot serve any more (e.g. a rank of its sequence-parallel group died): /readyz and
        new requests say so (503), the waiting requests are answered 503 at once instead of failing in turn.
        False (nothing done) when the service is stopping, stopped or failed already."""
        with self._lock:
            if self.state in ("stopping", "stopped", "failed"):
                return False
            self.failure, self.state = reason, "failed"
            waiting = list(self._waiting)
        for job in waiting:
            self._abort(job, "shutdown")
        log.error("the service cannot serve any more: %s", reason)
        return True

    def begin_shutdown(self) -> None:
        """Refuse new requests and answer every waiting one 503; the running one goes on."""
        with self._lock:
            if self.state in ("stopping", "stopped"):
                return
            self.state = "stopping"
            waiting = list(self._waiting)
        for job in waiting:
            self._abort(job, "shutdown")
        log.info("shutting down: %d waiting request(s) answered 503", len(waiting))

    def close(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop: graceful lets the running request finish; otherwise it stops at its next step."""
        self.begin_shutdown()
        loader = self._loader
        if loader is not None and loader.is_alive() and threading.current_thread() is not loader:
            # Loading or warming: let it stop (it checks the state between sizes) rather than leave a
            # thread running torch while the interpreter exits.
            loader.join(timeout)
        if not graceful and self._running is not None:
            self._abort(self._running, "shutdown")
        if self._queue is not None:
            self._queue.close(cancel_pending=True, wait=True, timeout=timeout)
        if self._gpu_monitor is not None:
            self._gpu_monitor.stop()
        if self._factory is not None and self.pipe is not None and hasattr(self.pipe, "close"):
            # A pipeline we made is ours to close (sequence-parallel: that releases its other ranks).
            try:
                self.pipe.close()
            except Exception as error:  # noqa: BLE001 - e.g. a rank already gone: nothing left to release
                log.warning("closing the pipeline: %s", error)
        self.state = "stopped"

    # -- requests ------------------------------------------------------------------------------
    @property
    def takes_control_images(self) -> bool:
        """Started with a ControlNet: generations (and edits with a mask) may carry a control image."""
        return self.settings.controlnet is not None

    def task_family(self) -> PipelineFamily:
        """The pipelines by task, or a ServiceError 503 while the pipeline is loading."""
        if self.family is None:
            raise ServiceError(503, "not_ready", f"the service is {self.state}; retry later", retry_after=5.0)
        return self.family

    def submit(self, req: ImageRequest, request_id: str | None = None, listen: bool = False,
               progress: bool = False, images: TaskImages | None = None) -> Job:
        """Check and queue a request; raises ServiceError (422, 429, 503) at once instead of queueing.
        `listen`: events go to a queue of this event loop; `progress`: the listener follows every step;
        `images`: an edit's or a ControlNet request's (family.py), at the request's size."""
        request_id = request_id or uuid.uuid4().hex
        if self.state != "ready":
            raise ServiceError(503, "not_ready" if self.state in ("created", "loading", "warming") else "shutting_down",
                               f"the service is {self.state}; retry later", retry_after=5.0)
        check_with_pipeline(self.pipe, req)
        task = self.family.task_for(images)
        strength = images.resolved_strength(task) if images is not None else None
        check_strength_leaves_steps(task, req.num_inference_steps, strength)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
        steps = steps_run(task, req.num_inference_steps, strength)
        job = Job(req, request_id, [seed + i for i in range(req.n)], estimate_ms=self._estimate_ms(req.n, steps),
                  task=task, images=images, steps=steps, progress=listen and progress)
        if listen:
            job.listeners.append((asyncio.get_running_loop(), asyncio.Queue()))
        with self._lock:
            try:
                job.future = self._queue.submit(job=job)
            except QueueFullError:
                self._counts["rejected_full"] += 1
                retry = max(1.0, math.ceil(self._eta_ms_locked(len(self._waiting)) / 1000.0))
                raise ServiceError(429, "queue_full", f"{len(self._waiting)} requests are waiting (the most this "
                                   f"server queues); retry after about {retry:.0f} s", retry_after=retry) from None
            except QueueClosedError:
                raise ServiceError(503, "shutting_down", "the service is shutting down") from None
            self._waiting.append(job)
            self._counts["submitted"] += 1
        return job

    async def generate(self, req: ImageRequest, request_id: str | None = None,
                       images: TaskImages | None = None) -> GeneratedImages:
        """The images of `req`, encoded (raises ServiceError for anything but images)."""
        job = self.submit(req, request_id, images=images)
        return await self._finish(job)

    async def stream(self, req: ImageRequest, request_id: str | None = None, progress: bool = True,
                     images: TaskImages | None = None) -> AsyncIterator[StreamEvent]:
        """queued (position, estimated start) -> started -> step (per image and step) and partial_image
        (the request's `previews`) -> done (a GeneratedImages).

        The request is queued when the first event is asked for, and a refusal (422/429/503) is raised
        there, before any event; a failure later comes as an `error` event (its data the ServiceError).
        `progress`: step events arrive as the steps end (on a GPU the worker then syncs each step).
        """
        job = self.submit(req, request_id, listen=True, progress=progress, images=images)
        _, events = job.listeners[0]
        with self._lock:
            position = self._waiting.index(job) if job in self._waiting else 0
            start_ms = self._eta_ms_locked(position)
        yield StreamEvent("queued", {"request_id": job.request_id, "position": position,
                                     "estimated_start_s": round(start_ms / 1000.0, 3), "images": req.n,
                                     "steps": job.steps, "task": job.task})
        finish = asyncio.ensure_future(self._finish(job))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, finish}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():  # steps the worker sent before the request ended
                    yield events.get_nowait()
                try:
                    body = finish.result()
                except ServiceError as error:
                    yield StreamEvent("error", error)
                else:
                    yield StreamEvent("done", body)
                return
        finally:
            if not finish.done():  # the client went away mid-stream
                self._abort(job, "disconnected")
                finish.cancel()

    async def _finish(self, job: Job) -> GeneratedImages:
        remaining = self.settings.timeout_s - (time.perf_counter() - job.submitted)
        waiter = asyncio.wrap_future(job.future)
        # Nobody awaits a dropped request's end: retrieve its outcome so asyncio does not warn about it.
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            images = await asyncio.wait_for(asyncio.shield(waiter), max(remaining, 0.001))
        except asyncio.TimeoutError:
            self._abort(job, "timeout")
            with self._lock:
                self._counts["timed_out"] += 1
            raise ServiceError(504, "timeout", f"the request did not finish within {self.settings.timeout_s:g} s "
                               f"(queue wait included); it was dropped") from None
        except (asyncio.CancelledError, CancelledError):
            if job.future.cancelled():  # dropped by a time-out or the shutdown, not by our caller
                raise self._aborted_error(job) from None
            self._abort(job, "disconnected")
            raise
        except _Aborted:
            raise self._aborted_error(job) from None
        except ServiceError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status; the stack stays in the log
            raise self._failure(job, error) from None
        req, level = job.request, self.settings.png_compress_level
        encoded = await asyncio.gather(*(asyncio.to_thread(encode_image, image, req.image_format, req.compression,
                                                           level) for image in images))
        return GeneratedImages(job.request_id, list(encoded), req.image_format, job.seeds, req.size,
                               self._job_timings(job), job.prompt_tokens,
                               input_images=job.images.count if job.images is not None else 0, task=job.task)

    def _prompt_tokens(self, prompt: str) -> int:
        """The prompt's tokens by the pipeline's tokenizer (for `usage`; 0 for a pipeline without one)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt, truncation=False).input_ids)

    def _aborted_error(self, job: Job) -> ServiceError:
        if job.abort_reason == "timeout":
            return ServiceError(504, "timeout", f"the request did not finish within {self.settings.timeout_s:g} s")
        return ServiceError(503, "shutting_down", "the service is shutting down; this request was not run",
                            retry_after=5.0)

    def _failure(self, job: Job, error: Exception) -> ServiceError:
        with self._lock:
            self._counts["failed"] += 1
        if isinstance(error, GenerationOOMError):
            return ServiceError(503, "out_of_memory", str(error), retry_after=10.0)
        if isinstance(error, NonFiniteOutputError):
            return ServiceError(500, "non_finite_output", str(error))
        if isinstance(error, EngineNotFound):
            # Its message names the server's folders: the client gets what to change instead.
            log.warning("request %s: %s", job.request_id, error)
            req = job.request
            cfg = " with guidance_scale > 0 (classifier-free guidance runs 2 images per engine call)" \
                if req.guidance_scale > 0 else ""
            return ServiceError(422, "no_engine", f"no engine on this server runs {req.size}{cfg}; "
                                f"{'use guidance_scale 0, or ' if cfg else ''}ask for a size it serves")
        if isinstance(error, (ValueError, TypeError)):
            return ServiceError(422, "invalid_request", str(error))
        log.error("request %s failed", job.request_id, exc_info=error)
        return ServiceError(500, "internal_error", f"the generation failed; the server log has the details "
                            f"under request id {job.request_id}")

    def _abort(self, job: Job, reason: str) -> None:
        """Drop a waiting request (its Future is cancelled) or stop a running one at its next step."""
        if job.abort_reason is None:
            job.abort_reason = reason
            key = {"shutdown": "cancelled_shutdown", "disconnected": "disconnected"}.get(reason)
            if key:
                with self._lock:
                    self._counts[key] += 1
        if job.future is not None and job.future.cancel():
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)

    # -- the worker thread ---------------------------------------------------------------------
    def _execute(self, job: Job):
        """Runs on the queue's worker: every image of one request, back to back. Returns the PIL images."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
            self._running = job
        try:
            if job.abort_reason is not None:
                raise _Aborted(job.abort_reason)
            job.started = time.perf_counter()
            self.metrics.queue_wait.observe(job.started - job.submitted)
            job.emit(StreamEvent("started", {"request_id": job.request_id,
                                             "queue_wait_ms": round((job.started - job.submitted) * 1000.0, 3)}))
            req, pipe, family = job.request, self.pipe, self.family
            resolution = req.resolution
            monitor = self._gpu_monitor
            mark = monitor.mark() if monitor is not None else None
            images = []
            for index, seed in enumerate(job.seeds):
                job.image_index, job.step = index, 0
                # The step-end latents are read only for previews, and while the previewer still learns.
                read_latents = bool(req.previews) or self.previewer.learning
                on_step = StepCallback(job, self.pipe, self.previewer, self.settings.png_compress_level, read_latents)
                out = family.run(job.task, job.images, req.prompt, negative_prompt=req.negative_prompt,
                                 height=resolution.height, width=resolution.width,
                                 num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                                 generator=torch.Generator(pipe.device).manual_seed(seed), callback_on_step_end=on_step,
                                 callback_on_step_end_tensor_inputs=["latents"] if read_latents else [])
                images.append(out.images[0])
                job.timings.append(out.timings)
                self._learn(out.timings)
                self.metrics.observe_image(out.timings)
                if on_step.final is not None:
                    self.previewer.observe(on_step.final, out.images[0])
            job.gpu_seen = monitor.seen_since(mark) if monitor is not None else None  # (no NVML call here)
            # Here, not on the event loop's threads: a fast tokenizer switching truncation on two threads at
            # once raises ("Already borrowed"), and the pipeline's own encoding runs on this thread.
            job.prompt_tokens = self._prompt_tokens(req.prompt)
            self._record(job)
            return images
        finally:
            with self._lock:
                self._running = None

    # -- estimates, stats ----------------------------------------------------------------------
    def _learn(self, timings) -> None:
        """Moving averages of a step's and of the rest of an image's time (text encoder, VAE)."""
        steps = timings.step_ms or ([timings.denoise_ms / max(1, len(timings.step_ms))] if timings.denoise_ms else [])
        if not steps:
            return
        step = sum(steps) / len(steps)
        overhead = max(0.0, timings.total_ms - timings.denoise_ms)
        alpha = 0.2
        with self._lock:
            if self._step_ms_estimate is None:
                self._step_ms_estimate, self._overhead_ms_estimate = step, overhead
            else:
                self._step_ms_estimate += alpha * (step - self._step_ms_estimate)
                self._overhead_ms_estimate += alpha * (overhead - self._overhead_ms_estimate)

    def _estimate_ms(self, images: int, steps: int) -> float:
        step = self._step_ms_estimate or 0.0
        return images * ((self._overhead_ms_estimate or 0.0) + steps * step)

    def _remaining_ms_locked(self) -> float:
        job = self._running
        if job is None or job.started is None:
            return 0.0
        return max(0.0, job.estimate_ms - (time.perf_counter() - job.started) * 1000.0)

    def _eta_ms_locked(self, position: int) -> float:
        """Estimated ms until the waiting request at `position` starts (the lock held)."""
        return self._remaining_ms_locked() + sum(job.estimate_ms for job in self._waiting[:position])

    def _record(self, job: Job) -> None:
        done = time.perf_counter()
        per_image = [t.total_ms for t in job.timings]
        # The pipeline's own step times (CUDA events on a GPU, wall time on a CPU) where it has them: the
        # callback's first interval also holds the text encoder.
        steps = [ms for t in job.timings for ms in t.step_ms] or job.step_ms
        last_steps = list(job.timings[-1].step_ms) or job.step_ms[-job.steps:]
        entry = {"t": time.time(), "request_id": job.request_id, "task": job.task, "size": job.request.size,
                 "n": job.request.n, "steps": job.steps, "request_ms": (done - job.submitted) * 1000.0,
                 "queue_wait_ms": (job.started - job.submitted) * 1000.0, "per_image_ms": sum(per_image) / len(per_image),
                 "step_ms": sum(steps) / len(steps) if steps else None}
        if job.gpu_seen is not None:
            entry["gpu_seen"] = job.gpu_seen
            entry["slowed_by"] = job.gpu_seen["causes"]
        with self._lock:
            self._history.append(entry)
            self._counts["completed"] += 1
            self._last_steps = last_steps
        self.metrics.request_latency.observe(entry["request_ms"] / 1000.0)
        self.metrics.task_requests.labels(task=job.task).inc()

    def _job_timings(self, job: Job) -> dict:
        first = job.timings[0] if job.timings else None
        return json_finite({
            "queue_wait_ms": (job.started - job.submitted) * 1000.0 if job.started else None,
            "run_ms": sum(t.total_ms for t in job.timings),
            "per_image_ms": [t.total_ms for t in job.timings],
            "text_encode_ms": sum(t.text_encode_ms for t in job.timings),
            "denoise_ms": sum(t.denoise_ms for t in job.timings),
            "vae_decode_ms": sum(t.vae_decode_ms for t in job.timings),
            "step_ms": list(first.step_ms) if first is not None and first.step_ms else list(job.step_ms),
            **({"preview_ms": job.preview_ms, "previews": job.previews, "previews_skipped": job.previews_skipped}
               if job.request.previews else {}),
        })

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    def stats(self) -> dict[str, Any]:
        """What the dashboard draws: queue (with ETAs), recent requests, latency summaries, GPU readings."""
        with self._lock:
            history = list(self._history)
            running = self._running
            waiting = [(job, self._eta_ms_locked(i)) for i, job in enumerate(self._waiting)]
            counts = dict(self._counts)
            last_steps = list(self._last_steps)
        now = time.perf_counter()
        run = None
        if running is not None and running.started is not None:
            run = {"request_id": running.request_id, "task": running.task, "size": running.request.size,
                   "n": running.request.n, "image": running.image_index, "step": running.step, "steps": running.steps,
                   "elapsed_s": now - running.started,
                   "eta_done_s": max(0.0, running.estimate_ms / 1000.0 - (now - running.started))}
        queue = [{"request_id": job.request_id, "task": job.task, "position": i, "size": job.request.size,
                  "n": job.request.n, "steps": job.steps, "waited_s": now - job.submitted,
                  "eta_start_s": eta / 1000.0, "eta_done_s": (eta + job.estimate_ms) / 1000.0}
                 for i, (job, eta) in enumerate(waiting)]
        pipe = self.pipe
        device = getattr(pipe, "device", None)
        result = {
            "state": self.state, "ready": self.ready, "failure": "see the server log" if self.failure else None,
            "device": str(device) if device is not None else None,
            "uptime_s": time.time() - self.started_at,
            "sizes": list(self.limits.sizes), "any_size": self.limits.any_size,
            "queue": {"depth": len(queue), "max": self.settings.max_queue, "running": run, "waiting": queue},
            "counts": counts,
            "latency": {name: summarize(e[name] for e in history if e[name] is not None)
                        for name in ("request_ms", "per_image_ms", "queue_wait_ms", "step_ms")},
            "recent": history[-200:],
            "tasks": task_summary(self.family.tasks if self.family is not None else (), history),
            "last_steps_ms": last_steps,
            "gpu": self.gpu_sample(),
            "gpu_sharing": self.gpu_sharing(),
            "pipeline": pipe.stats() if pipe is not None and hasattr(pipe, "stats") else {},
        }
        return json_finite(result)

    def gpu_sample(self) -> dict:
        sampler = self._sampler
        if sampler is None or not sampler.available:
            return {}
        return {"name": sampler.gpu_name, **sampler.sample()}

    # -- the GPU monitor (runtime/gpu_monitor.py): other processes and throttling ----------------------
    def _start_gpu_monitor(self) -> None:
        device = getattr(self.pipe, "device", None)
        self._gpu_monitor = self._gpu_monitor or GpuMonitor.for_device(device)
        if self._gpu_monitor is not None:
            self._gpu_monitor.start(busy=lambda: self._running is not None, own_bytes_hint=reserved_bytes(device))

    def gpu_sharing(self) -> dict | None:
        """The monitor's latest sample (other processes, throttle reasons) and the seconds each reason held."""
        monitor = self._gpu_monitor
        return None if monitor is None else {**monitor.summary(), "not_ready_when_shared": self.settings.not_ready_when_shared}

    def unready_reason(self) -> str | None:
        """With `not_ready_when_shared`: why /readyz says 503 while the service runs (another process
        computes on the GPU); else None."""
        monitor = self._gpu_monitor
        return monitor.sharing_reason() if monitor is not None and self.settings.not_ready_when_shared else None
