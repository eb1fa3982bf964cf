"""`ZImageTRTPipeline`: diffusers' `ZImagePipeline` API over compiled, fixed-shape denoiser engines.

    pipe = ZImageTRTPipeline.from_pretrained("path/to/Z-Image-Turbo", engine_dir="engines/")
    out = pipe("a red fox in the snow", height=1024, width=1024, generator=torch.Generator().manual_seed(0))
    out.images[0].save("fox.png"); print(out.timings.total_ms)

The numbers match diffusers' pipeline (same seed -> same image, up to the engine's precision):

1. text: each prompt goes through the tokenizer's chat template (`enable_thinking=True`), right
   padding, the encoder's `hidden_states[-2]`, and only the real (unmasked) tokens are kept, as
   diffusers does; diffusers pads to `max_sequence_length`, we to the real tokens + 1 (rounded up to
   64 under CUDA graphs): same features within rounding (`pad_prompts_to_max_length=True`: bitwise);
2. latents: `randn_tensor` with the caller's generator, float32, [B, 16, 2*(H//16), 2*(W//16)];
3. schedule: diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n), mu=...)`;
4. denoise: the runtime's `DenoiseLoop` (engine per step, CFG and the Euler update on the GPU);
5. image: diffusers' `AutoencoderKL.decode` and `VaeImageProcessor.postprocess`.

Non-finite final latents (e.g. fp16 overflow) raise `NonFiniteOutputError` instead of becoming a
black image.
Running out of device memory raises `GenerationOOMError` (with advice: smaller size, fewer images)
after releasing that request's buffers; the pipeline serves the next request as before.
"""


from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor

from .engines.select import fp8_keep_in, open_denoiser
from .engines.torch_compiled import compile_vae_decoder, compile_vae_encoder
from .errors import GenerationOOMError, NonFiniteOutputError, PromptTruncatedWarning
from .lora.pipeline_mixin import LoraPipelineMixin
from .model.shapes import Resolution
from .model.single_file import DEFAULT_CONFIG as SINGLE_FILE_DEFAULT_CONFIG, load_single_file_transformer
from .model.weights import load_pipeline_parts, load_transformer, weights_fingerprint
from .options import PipelineOptions
from .parallel import SequenceParallelError, check_launch
from .parallel import start as start_sequence_parallel
from .request import (
    CALLBACK_TENSOR_INPUTS,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_SIDE,
    TURBO_GUIDANCE,
    TURBO_STEPS,
    Request,
    RequestLimits,
    check_attention_kwargs,
    check_request,
)
from .runtime import image_output, out_of_memory
from .runtime.denoise_loop import ControlInput, DenoiseLoop, InpaintBlend
from .runtime.placement import place_components, use_text_encoder_fp8_kernel
from .runtime.queue import GenerationQueue
from .runtime.step_callback import diffusers_step_callback
from .runtime.telemetry import Telemetry, Timings
from .runtime.text_encoder import PromptEncoder

# The errors a call raises are importable from here too, as before the errors had a module of their own.
__all__ = ["ZImageTRTPipeline", "ZImageTRTPipelineOutput", "DenoisePlan", "GenerationOOMError", "NonFiniteOutputError",
           "PromptTruncatedWarning"]

# check_request's keywords, taken from a call's arguments (the rest are the call's own: output, callback, ...).
REQUEST_ARGUMENTS = tuple(p for p in inspect.signature(check_request).parameters if p != "limits")
TEXT_TO_IMAGE = "text-to-image"


@dataclass
class ZImageTRTPipelineOutput:
    images: Any  # list of PIL images, np.ndarray [B,H,W,3], torch.Tensor [B,3,H,W], or latents
    timings: Timings

    def to_tuple(self) -> tuple:
        """What `return_dict=False` returns: `(images,)`, as diffusers' pipelines do."""
        return (self.images,)

    def __getitem__(self, key):
        # diffusers' outputs index like that tuple: out[0] (or out["images"]) is the images.
        if isinstance(key, str):
            if key not in ("images", "timings"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class DenoisePlan:
    """What a task (tasks/) hands the one denoising core: the starting latents and the schedule it runs
    (cut by `strength` for image to image), and what the loop does inside each step besides the model:
    the inpaint blend and the ControlNet (None for text to image, which then pays nothing for them)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    blend: InpaintBlend | None = None
    control: ControlInput | None = None


class SharedLora:
    """The LoRA state of pipelines made from one another (`from_pipe`): they share the weights."""

    state = None
    merger = None


class ZImageTRTPipeline(LoraPipelineMixin):
    """Text -> image with Z-Image-Turbo, the denoiser running as compiled engines.

    Build it with `from_pretrained` (a diffusers-format folder or hub id) or `from_components`
    (already-loaded diffusers/transformers modules). Options are keyword arguments (see
    `PipelineOptions`: engine_dir, device, torch_dtype, precision, allow_fallback, ...). Calls are
    serialised by a lock, so one pipeline may be shared by threads; `submit` queues work for a single
    GPU worker thread instead.
    """

    # What a step callback may read and replace (diffusers' name): the loop keeps the prompt embeddings in
    # engine buffers, so only the latents.
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)
    # A task class's own constructor keywords, which from_pretrained/from_single_file pass on (controlnet=).
    TASK_KEYWORDS: tuple[str, ...] = ()

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler,
                 options: PipelineOptions | None = None, **option_keywords):
        """The parts are moved (not copied) to their devices, and converted to FP8 where asked."""
        self.options = opts = PipelineOptions.from_keywords(options, **option_keywords)
        self.device, self.dtype = opts.device, opts.torch_dtype
        # Sequence parallelism: the degree checked against the model's heads, then the process group joined.
        self._parallel = None if opts.sequence_parallel == 1 else start_sequence_parallel(
            transformer, opts.sequence_parallel, self.device, timeout_s=opts.sequence_parallel_timeout_s,
            cuda_graph=opts.sequence_parallel_cuda_graph, engine_dir=opts.engine_dir)
        self.engine_dir, self.precision = opts.engine_dir, opts.precision
        self.text_encoder_device = opts.text_encoder_device
        self.text_encoder_fp8 = place_components(
            transformer, vae, text_encoder, device=self.device, dtype=self.dtype,
            text_encoder_device=self.text_encoder_device, precision=opts.precision,
            text_encoder_fp8=opts.text_encoder_fp8, fp8_keep=fp8_keep_in(opts.engine_dir) if opts.precision == "fp8" else ())
        self.text_encoder_fp8_kernel = self.text_encoder_fp8 and use_text_encoder_fp8_kernel(
            text_encoder, opts.text_encoder_fp8_kernel, self.text_encoder_device)
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.latent_channels = int(transformer.config.in_channels)
        self.caption_feature_dim = int(transformer.config.cap_feat_dim)
        # Caption row i has RoPE position 1 + i and the image sits after the caption: both in the table.
        self.max_caption_tokens = int(transformer.config.axes_lens[0]) - 2
        self._prompts = PromptEncoder(text_encoder, tokenizer, self.text_encoder_device,
                                      use_cuda_graph=opts.use_cuda_graph, pad_to_max_length=opts.pad_prompts_to_max_length)
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        self._limits = RequestLimits(self.caption_feature_dim, self.max_caption_tokens, self.latent_channels,
                                     self.image_processor.config.vae_scale_factor,
                                     tuple(int(n) for n in transformer.config.axes_lens))
        if opts.compile_vae:
            # One static graph per resolution at its first image (from the engine's artefacts when the
            # build compiled the VAE too).
            compile_vae_decoder(vae)
            compile_vae_encoder(vae)  # (the image tasks' inputs; compiled at its first image, if any)
        self.telemetry = Telemetry(self.device, history=opts.telemetry_history)
        self._pinned_images = image_output.PinnedImages()  # host buffers for the decoded pixels (GPU only)
        self.show_progress = True
        self._loops: dict[tuple, DenoiseLoop] = {}
        self._engines: dict[tuple, Any] = {}  # engine files opened once, whatever the number of shapes
        self._lock = threading.RLock()
        self._shared_lora = SharedLora()
        self._queue = None
        self._queue_lock = threading.Lock()
        # The current (or last) call's, as diffusers' pipelines expose them to step callbacks; a callback
        # may change `_guidance_scale` and the following steps use the new value, as in diffusers.
        self._guidance_scale, self._num_timesteps, self._joint_attention_kwargs = TURBO_GUIDANCE, 0, None
        # diffusers' `pipe._interrupt`: a step callback sets it to skip the remaining steps (reset per call).
        self._interrupt = False

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model, engine_dir=None, **options) -> "ZImageTRTPipeline":
        """Load the parts from a local diffusers-format folder (or a hub id) with safetensors only.

        `device` defaults to "cuda" when available; `torch_dtype` to the default build's
        dtype when `engine_dir` is given (fp16 on CUDA, fp32 on CPU: what `zimage-trt build` makes by
        default), else bf16 on CUDA and fp32 on CPU.
        `text_encoder_device` puts the text encoder elsewhere (e.g. "cpu" to save GPU memory).
        """
        parts_of_task = {name: options.pop(name) for name in cls.TASK_KEYWORDS if name in options}
        opts = PipelineOptions.from_keywords(engine_dir=engine_dir, **options)
        check_launch(opts.sequence_parallel)  # before loading gigabytes: is this a torchrun process?
        # Load on the CPU; the constructor moves each part once (the text encoder may live elsewhere).
        parts = load_pipeline_parts(model, torch_dtype=opts.torch_dtype, device="cpu")
        # FP8: on the CPU too, so that it is converted block by block on its way to the GPU.
        fp8 = opts.precision == "fp8"
        transformer = load_transformer(model, torch_dtype=opts.torch_dtype, device="cpu" if fp8 else opts.device)
        if engine_dir is not None and opts.weights_fingerprint is None:
            # Same digest as the build's when it built from these files (stored dtype, sampled bytes):
            # an engine with other weights baked in is refused instead of silently used.
            opts.weights_fingerprint = weights_fingerprint(model)
        return cls.from_components(transformer, **parts, options=opts, **parts_of_task)

    @classmethod
    def from_single_file(cls, path, config=None, engine_dir=None, **options) -> "ZImageTRTPipeline":
        """The transformer from one .safetensors checkpoint (ComfyUI-style keys or diffusers'), through
        diffusers' single-file loader; its config and the other parts from `config`, a diffusers-format
        folder or hub id (default, as diffusers: Tongyi-MAI/Z-Image-Turbo). Other arguments as from_pretrained."""
        parts_of_task = {name: options.pop(name) for name in cls.TASK_KEYWORDS if name in options}
        opts = PipelineOptions.from_keywords(engine_dir=engine_dir, **options)
        transformer, fingerprint = load_single_file_transformer(path, config, torch_dtype=opts.torch_dtype)
        parts = load_pipeline_parts(config or SINGLE_FILE_DEFAULT_CONFIG, torch_dtype=opts.torch_dtype, device="cpu")
        if engine_dir is not None and opts.weights_fingerprint is None:
            opts.weights_fingerprint = fingerprint
        return cls.from_components(transformer, **parts, options=opts, **parts_of_task)

    @classmethod
    def from_components(cls, transformer, vae, text_encoder, tokenizer, scheduler, engine_dir=None,
                        **options) -> "ZImageTRTPipeline":
        """Wrap already-loaded components (e.g. a diffusers pipeline's); they are moved, not copied."""
        if engine_dir is not None:
            options["engine_dir"] = engine_dir
        return cls(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   scheduler=scheduler, **options)

    @classmethod
    def from_pipe(cls, pipe: "ZImageTRTPipeline", **kwargs) -> "ZImageTRTPipeline":
        """diffusers' `from_pipe`: a pipeline of this class over `pipe`'s already-loaded parts, sharing
        its engines, loops and buffers, LoRA state, telemetry and lock (one family of pipelines over one
        set of weights: a call of one waits for a call of another). `kwargs`: this class's own parts
        (`controlnet=` for the ControlNet classes); the shared ones cannot be swapped (engines are tied
        to the weights they were opened with)."""
        if not isinstance(pipe, ZImageTRTPipeline):
            raise TypeError(f"from_pipe takes one of our pipelines (ZImageTRTPipeline or a task class), got "
                            f"{type(pipe).__name__}; for diffusers' own pipeline use from_components(**pipe.components)")
        new = cls.__new__(cls)
        new.__dict__.update(copy.copy(pipe.__dict__))  # the same objects: nothing is copied or reloaded
        new._queue, new._queue_lock = None, threading.Lock()  # each pipeline's own worker (its own __call__)
        new._task_parts(pipe, **kwargs)
        return new

    def _task_parts(self, source, **kwargs) -> None:
        """A task class's own parts when made by `from_pipe` (the ControlNet classes take `controlnet=`)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.from_pipe takes no {sorted(kwargs)}: the parts, engines and "
                            f"options are {type(source).__name__}'s, shared")

    _lora_state = property(lambda self: self._shared_lora.state,
                           lambda self, value: setattr(self._shared_lora, "state", value))
    _lora_merger = property(lambda self: self._shared_lora.merger,
                            lambda self, value: setattr(self._shared_lora, "merger", value))

    def set_progress_bar_config(self, disable: bool = False, **_ignored) -> None:
        """diffusers-compatible switch for the per-step progress bar."""
        self.show_progress = not disable

    @property
    def components(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "scheduler": self.scheduler}

    guidance_scale = property(lambda self: self._guidance_scale)
    do_classifier_free_guidance = property(lambda self: self._guidance_scale > 0)
    num_timesteps = property(lambda self: self._num_timesteps)
    joint_attention_kwargs = property(lambda self: self._joint_attention_kwargs)
    interrupt = property(lambda self: self._interrupt)

    def to(self, *args, **kwargs) -> "ZImageTRTPipeline":
        """diffusers' `pipe.to(device, dtype)`. The parts were placed when the pipeline was made (engines
        open for one device and dtype), so the pipeline's own device and dtype are accepted, others refused."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() takes a device and/or a dtype, got {sorted(kwargs)}")
        for arg in args:
            dtype, device = (arg, device) if isinstance(arg, torch.dtype) else (dtype, arg)
        wanted = torch.device(device) if device is not None else self.device
        same_device = wanted.type == self.device.type and wanted.index in (None, self.device.index)
        if not same_device or (dtype is not None and dtype != self.dtype):
            raise ValueError(
                f"this pipeline runs on {self.device} in {self.dtype}; it cannot move to {wanted} "
                f"{dtype or self.dtype}: make it there with device=/torch_dtype= (from_pretrained, from_components)"
            )
        return self

    # -- 1. text ---------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
        """One [L_i, F] tensor per prompt: the encoder's second-to-last hidden states of the real tokens."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer; pass prompt_embeds instead of prompt")
        with self._lock:  # the text encoder's graph output is shared: one encoding at a time
            return self._prompts.encode(prompts, max_sequence_length)

    def warm_up_text_encoder(self, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, batch_sizes=(1,)) -> int:
        """Capture the text encoder's graph for every prompt-length bucket now (first-call cost out of the
        way, e.g. before a service reports ready); returns how many shapes ran (0 without CUDA graphs)."""
        if self.text_encoder is None or self.tokenizer is None:
            return 0
        with self._lock:
            return len(self._prompts.warm_up(max_sequence_length, batch_sizes))

    # -- 2. latents ------------------------------------------------------------------------------
    def latent_shape(self, images: int, resolution: Resolution) -> tuple[int, int, int, int]:
        return self._limits.latent_shape(images, resolution)

    def prepare_latents(self, images: int, resolution: Resolution, generator, latents=None) -> torch.Tensor:
        """Seeded noise as diffusers draws it, or the caller's `latents` (already checked by the call)."""
        if latents is not None:
            return latents.to(self.device, torch.float32)
        return randn_tensor(self.latent_shape(images, resolution), generator=generator, device=self.device,
                            dtype=torch.float32)

    # -- 3. schedule -----------------------------------------------------------------------------
    def schedule(self, num_inference_steps: int, latents, sigmas: list[float] | None = None):
        """(timesteps, sigmas) from diffusers' scheduler, set up exactly as `ZImagePipeline` does, for
        `latents` (a tensor or its shape)."""
        config = self.scheduler.config
        shape = tuple(getattr(latents, "shape", latents))
        image_seq_len = (shape[2] // 2) * (shape[3] // 2)
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = sigmas if sigmas is not None else get_default_z_image_sigmas(num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return self.scheduler.timesteps, self.scheduler.sigmas

    # -- 4. denoise ------------------------------------------------------------------------------
    def denoise_loop(self, resolution: Resolution, images: int, cfg: bool) -> DenoiseLoop:
        """The runtime loop for this shape; engines and loops are opened once and reused."""
        # CFG runs the conditional and unconditional halves as one engine batch.
        model_batch = images * (2 if cfg else 1)
        key = (resolution, model_batch)
        if key not in self._loops:
            opts = self.options
            engine = open_denoiser(
                self.transformer, self.engine_dir, self.device, self.dtype, resolution.key, model_batch,
                allow_fallback=opts.allow_fallback, precision=self.precision, cache=self._engines,
                weights_fingerprint=opts.weights_fingerprint, attention_backend=opts.attention_backend,
            )
            if self._parallel is not None:
                engine = self._parallel.shard(engine)  # its share of each step, on this rank
            # One engine may serve several shapes (optimisation profiles); keep one loop per engine.
            loop = next((known for known in self._loops.values() if known.engine is engine), None)
            if loop is None:
                self._lora_engine_opened(engine)  # merged LoRA weights for an engine holding its own
            self._loops[key] = loop or DenoiseLoop(
                engine, self.device, use_cuda_graph=opts.use_cuda_graph, stream_priority=opts.stream_priority
            )
        return self._loops[key]

    def _open_engines(self) -> list:
        """Every engine opened so far, once each (LoRA merging refits those holding their own weights)."""
        engines = [*self._engines.values(), *(loop.engine for loop in self._loops.values())]
        return list({id(e): e for e in engines}.values())

    # -- 5. image --------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        return image_output.decode_latents(self.vae, self.image_processor, latents, output_type, self._pinned_images)

    # -- the call --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = DEFAULT_SIDE,
        width: int | None = DEFAULT_SIDE,
        num_inference_steps: int = TURBO_STEPS,
        sigmas: list[float] | None = None,
        guidance_scale: float = TURBO_GUIDANCE,
        cfg_normalization: float | bool = False,
        cfg_truncation: float | None = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        *,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> ZImageTRTPipelineOutput | tuple:
        """Generate images. Same arguments as diffusers' `ZImagePipeline.__call__`, in its order, with Turbo's
        defaults (8 steps, guidance 0); the output also carries `.timings` (ms per stage and per step).
        `return_dict=False` returns `(images,)`. `joint_attention_kwargs` (or its other name,
        `attention_kwargs`) may only be None or `{"scale": 1.0}`: set a LoRA's scale with `set_adapters`.

        Every argument is checked before any work starts; a bad one raises ValueError/TypeError naming
        the argument, its value and the rule.
        """
        arguments = dict(locals())
        del arguments["self"]
        return self._call(None, arguments)

    def _call_arguments(self, **kwargs) -> dict[str, Any]:
        """A task class's keyword arguments with ZImageTRTPipeline's defaults for the rest (an unknown one
        is a TypeError naming what the call takes)."""
        try:
            bound = inspect.signature(ZImageTRTPipeline.__call__).bind(self, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}.__call__: {error}; it takes "
                            f"{list(inspect.signature(type(self).__call__).parameters)[1:]}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        return arguments

    def _call(self, task, arguments: dict[str, Any]):
        """The one call behind every class: checks, then text -> task plan -> DenoiseLoop -> image.
        `task` (tasks/: None for text to image) prepares the starting latents, schedule, mask and ControlNet
        context; everything else is this method's."""
        started = time.perf_counter()
        if self._parallel is not None and not self._parallel.is_main:
            raise SequenceParallelError("this is not rank 0 of the sequence-parallel group: call pipe.serve() "
                                        "here, and the pipeline itself on rank 0 (pipe.is_main_process)")
        request = check_request(self._limits, **{name: arguments[name] for name in REQUEST_ARGUMENTS})
        check_attention_kwargs(arguments["joint_attention_kwargs"], arguments["attention_kwargs"])
        if task is not None:
            task.check(self, request)  # its images, mask, strength, ControlNet: before any work
        joint = arguments["joint_attention_kwargs"]
        with self._lock, self._on_device():
            self._guidance_scale = request.guidance
            self._interrupt = False
            self._joint_attention_kwargs = joint if joint is not None else arguments["attention_kwargs"]
            timings = Timings(num_images=request.images, task=task.name if task is not None else TEXT_TO_IMAGE)
            try:
                images = self._generate(request, task, arguments["generator"], arguments["latents"],
                                        arguments["callback_on_step_end"], timings)
            except Exception as error:
                if not out_of_memory.is_out_of_memory(error):
                    raise
                self._release_after_oom(request, error)
                size = request.resolution
                raise GenerationOOMError(out_of_memory.oom_message(
                    error, self.device, images=request.images, height=size.height, width=size.width,
                    cfg=request.cfg)) from error
            timings.total_ms = (time.perf_counter() - started) * 1000.0
        self.telemetry.record(timings)
        output = ZImageTRTPipelineOutput(images=images, timings=timings)
        return output if arguments["return_dict"] else output.to_tuple()

    def plan(self, request: Request, generator, latents) -> DenoisePlan:
        """Text to image: seeded noise (or the caller's latents) over the whole schedule."""
        initial = self.prepare_latents(request.images, request.resolution, generator, latents)
        timesteps, sigmas = self.schedule(request.steps, initial, request.sigmas)
        return DenoisePlan(initial, timesteps, sigmas)

    def _generate(self, request: Request, task, generator, latents, callback, timings: Timings):
        """Text, the task's plan, the loop, the image, for checked arguments; fills `timings` as it goes."""
        with self._stage(timings, "text_encode_ms", self.text_encoder_device):
            positive, negative = self._text_embeddings(request)
        if task is None:
            plan = self.plan(request, generator, latents)
        else:
            with self._stage(timings, "vae_encode_ms"):
                plan = task.plan(self, request, generator, latents)
        self._num_timesteps = len(plan.timesteps)
        loop = self.denoise_loop(request.resolution, request.images, request.cfg)
        if self._parallel is not None:  # the other ranks get this loop's inputs and run it with us
            loop = self._parallel.lead(loop, request.resolution.key, request.images, request.cfg, callback is not None)
        step_callback = diffusers_step_callback(self, callback, request.tensor_inputs, timings)
        # Only what a task needs reaches the loop: text to image runs exactly the plain step.
        extras = {name: value for name, value in (("blend", plan.blend), ("control", plan.control)) if value is not None}
        with self._stage(timings, "denoise_ms"):
            final = loop(
                plan.latents,
                positive,
                negative,
                plan.timesteps,
                plan.sigmas,
                # With a callback, each step reads the guidance the callback may have changed.
                guidance_scale=request.guidance if callback is None else lambda: float(self._guidance_scale),
                cfg_normalization=request.normalization,
                cfg_truncation=request.truncation,
                callback=step_callback,
                progress=self.show_progress,
                # diffusers' interrupt: once a step callback sets `pipe._interrupt`, no further step runs and
                # the latents so far are decoded.
                interrupted=lambda: bool(self._interrupt),
                **extras,
            )
        if self.device.type == "cuda":  # the loop timed each step with CUDA events
            timings.step_ms = list(loop.last_step_times_ms)
        image_output.check_finite_latents(final, self.dtype)
        with self._stage(timings, "vae_decode_ms"):
            return self.decode_latents(final, request.output_type)

    def _release_after_oom(self, request: Request, error: BaseException) -> None:
        """Leave nothing half-made after an out-of-memory error, and give the memory back: the failed
        call's intermediates (held by the error's frames), the loop's buffers and graph for this shape
        (a step or a capture may have stopped half way; other shapes' are untouched), the text
        encoder's graphs (likewise), and the allocator's cached blocks."""
        out_of_memory.clear_frames(error)
        shape = self.latent_shape(request.images, request.resolution)
        for loop in {id(loop): loop for loop in self._loops.values()}.values():
            loop.discard_slots(shape)
        self._prompts.runner.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _text_embeddings(self, request: Request):
        """Prompt (and, with CFG, negative) embeddings, one per image."""
        positive = request.embeds
        if positive is None:
            positive = self.encode_prompt(request.texts, request.max_tokens)
        negative = None
        if request.cfg:
            negative = request.negative_embeds
            if negative is None:
                negative = self.encode_prompt(request.negative_texts, request.max_tokens)
        return _repeat_per_image(positive, request.per_prompt), _repeat_per_image(negative, request.per_prompt)

    @contextlib.contextmanager
    def _stage(self, timings: Timings, name: str, *devices: torch.device):
        """Adds the stage's wall time to `timings.<name>`; syncs the GPU so the time is the work's, not the launch's."""
        start = time.perf_counter()
        yield
        for device in {d for d in (self.device, *devices) if d.type == "cuda"}:
            torch.cuda.synchronize(device)
        setattr(timings, name, getattr(timings, name) + (time.perf_counter() - start) * 1000.0)

    def _on_device(self):
        # A worker thread starts on CUDA device 0; make ours current for the whole call.
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- several processes for one image (sequence_parallel > 1) --------------------------------
    @property
    def is_main_process(self) -> bool:
        """True on rank 0 (the one to call), and whenever sequence parallelism is off."""
        return self._parallel is None or self._parallel.is_main

    def serve(self) -> int:
        """Ranks other than 0: run each call's share until rank 0 closes its pipeline; returns the calls served."""
        if self.is_main_process:
            raise SequenceParallelError("serve() is for ranks other than 0 of a sequence-parallel pipeline; "
                                        "on this one, call the pipeline")
        with torch.no_grad(), self._on_device():
            return self._parallel.serve(lambda key, images, cfg: self.denoise_loop(Resolution.parse(key), images, cfg))

    # -- serving and statistics ------------------------------------------------------------------
    def submit(self, **kwargs):
        """Queue a generation for the pipeline's single GPU worker thread; returns a Future."""
        with self._queue_lock:
            if self._queue is None or self._queue.closed:
                self._queue = GenerationQueue(self)
            queue = self._queue
        return queue.submit(**kwargs)

    def stats(self) -> dict[str, Any]:
        """Latency summaries (mean, std, p50, p95, cv) per stage over recent calls, plus GPU samples."""
        return self.telemetry.stats()

    def close(self) -> None:
        """Finish queued requests and stop the worker thread (if `submit` started one)."""
        with self._queue_lock:
            queue, self._queue = self._queue, None
        if queue is not None:
            queue.close()
        if self._parallel is not None:
            self._parallel.close()  # rank 0: releases the other ranks' serve()

    def __enter__(self) -> "ZImageTRTPipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _repeat_per_image(embeds: list[torch.Tensor] | None, per_prompt: int) -> list[torch.Tensor] | None:
    # diffusers' order: all images of prompt 0, then of prompt 1, ...
    if embeds is None:
        return None
    return [e for e in embeds for _ in range(per_prompt)]
