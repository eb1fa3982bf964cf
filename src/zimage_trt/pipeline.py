"""`ZImageTRTPipeline`: diffusers' `ZImagePipeline` API over compiled, fixed-shape denoiser engines.

    pipe = ZImageTRTPipeline.from_pretrained("path/to/Z-Image-Turbo", engine_dir="engines/")
    out = pipe("a red fox in the snow", height=1024, width=1024, generator=torch.Generator().manual_seed(0))
    out.images[0].save("fox.png"); print(out.timings.total_ms)

The numbers match diffusers' pipeline (same seed -> same image, up to the engine's precision):

1. text: each prompt goes through the tokenizer's chat template (`enable_thinking=True`), padding to
   `max_sequence_length`, the encoder's `hidden_states[-2]`, and only the real (unmasked) tokens are
   kept, as diffusers does (`pad_prompts_to_max_length=False` skips most of the padding);
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
import math
import numbers
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .shapes import LATENT_CHANNELS, Resolution, check_side
from .text_encoder import TextEncoderRunner, quantize_text_encoder_fp8
from .telemetry import Telemetry, Timings

DEFAULT_SIDE = 1024
TURBO_STEPS = 8
TURBO_GUIDANCE = 0.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # diffusers pads and truncates prompts to this many tokens
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The loop keeps prompt embeddings in engine buffers, so a step callback may read and replace only latents.
CALLBACK_TENSOR_INPUTS = ("latents",)


class NonFiniteOutputError(RuntimeError):
    """The generated latents or decoded pixels hold NaN or inf (typically fp16 overflow)."""


class GenerationOOMError(RuntimeError):
    """The device ran out of memory during a generation (`__cause__` is the original error).

    The request's buffers, captured graphs and intermediates were released; the pipeline stays usable.
    Retry with a smaller size or fewer images per call.
    """


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than `max_sequence_length`; the tail was dropped (diffusers does it silently)."""


@dataclass
class ZImageTRTPipelineOutput:
    images: Any  # list of PIL images, np.ndarray [B,H,W,3], torch.Tensor [B,3,H,W], or latents
    timings: Timings


# --------------------------------------------------------------------------------------------------
# Argument checks: each names the argument, the value it got and the rule it broke.
# --------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value, minimum: float | None = None) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _check_prompts(name: str, prompt) -> list[str]:
    if isinstance(prompt, str):
        return [_check_text(name, prompt)]
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}; decode it first, "
                        f"e.g. {name}.decode('utf-8')")
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{name} is an empty list; pass at least one prompt (an empty string is a valid prompt)")
    for i, item in enumerate(prompt):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__} {item!r}")
        _check_text(f"{name}[{i}]", item)
    return list(prompt)


def _check_text(name: str, text: str) -> str:
    """A str the tokenizer can take: lone surrogates (e.g. from bytes decoded with 'surrogateescape') are not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid Unicode: {exc.reason} {text[exc.start:exc.end]!r} at character {exc.start}; "
            f"decode the original bytes with errors='replace' or remove the character"
        ) from None
    return text


def _check_negative_prompts(negative_prompt, count: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = _check_prompts("negative_prompt", negative_prompt)
    if isinstance(negative_prompt, str):
        return negatives * count
    if len(negatives) != count:
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but there are {count} prompts; "
            f"pass one negative prompt per prompt, or a single string for all"
        )
    return negatives


def _check_embeddings(name: str, embeds, feature_dim: int, max_tokens: int) -> list[torch.Tensor]:
    """A list of [L, F] tensors (a [B, L, F] tensor is split into one per item)."""
    if isinstance(embeds, torch.Tensor):
        if embeds.ndim != 3:
            raise ValueError(f"{name} as one tensor must be [batch, tokens, {feature_dim}], got shape {tuple(embeds.shape)}")
        embeds = list(embeds.unbind(0))
    if not isinstance(embeds, (list, tuple)):
        raise TypeError(f"{name} must be a list of [tokens, {feature_dim}] tensors, got {type(embeds).__name__}")
    if not embeds:
        raise ValueError(f"{name} is an empty list; pass one [tokens, {feature_dim}] tensor per prompt")
    for i, item in enumerate(embeds):
        _check_embedding(f"{name}[{i}]", item, feature_dim, max_tokens)
    return list(embeds)


def _check_embedding(name: str, item, feature_dim: int, max_tokens: int) -> None:
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(item).__name__}")
    if not item.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {item.dtype}")
    if item.ndim != 2 or item.shape[1] != feature_dim:
        raise ValueError(
            f"{name} must have shape [tokens, {feature_dim}] (the text encoder's hidden size), got {tuple(item.shape)}"
        )
    if not 1 <= item.shape[0] <= max_tokens:
        raise ValueError(f"{name} has {item.shape[0]} tokens; the transformer takes 1..{max_tokens}")
    if not torch.isfinite(item).all():
        raise ValueError(f"{name} contains NaN or inf values")


def _check_latents(latents, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(
            f"latents has shape {tuple(latents.shape)}, expected {shape} "
            f"(images, {LATENT_CHANNELS} channels, height/8, width/8)"
        )
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor (float32 preferred), got dtype {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contains NaN or inf values")
    return latents


def _check_generator(generator, images: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    if len(generator) != images:
        raise ValueError(
            f"generator is a list of {len(generator)} generators but {images} images are requested "
            f"(prompts x num_images_per_prompt); pass one generator per image or a single generator"
        )
    for i, item in enumerate(generator):
        if not isinstance(item, torch.Generator):
            raise TypeError(f"generator[{i}] must be a torch.Generator, got {type(item).__name__}")


def _check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type


def _check_callback(callback, tensor_inputs) -> list[str]:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if isinstance(tensor_inputs, str):
        raise TypeError(
            f"callback_on_step_end_tensor_inputs must be a list of names such as ['latents'], got str {tensor_inputs!r}"
        )
    names = list(tensor_inputs or [])
    unknown = [name for name in names if name not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs may name only {list(CALLBACK_TENSOR_INPUTS)}, got {unknown}"
        )
    return names


def _check_cfg_normalization(value) -> float:
    if isinstance(value, bool):
        return float(value)
    return _check_real("cfg_normalization", value, minimum=0.0)


def _check_sigmas(sigmas) -> list[float] | None:
    if sigmas is None:
        return None
    try:
        values = [float(s) for s in sigmas] if isinstance(sigmas, (list, tuple, torch.Tensor)) else None
    except (TypeError, ValueError, RuntimeError):  # non-numbers, or a tensor that is not 1-D
        values = None
    if not values or not all(math.isfinite(s) and 0 < s <= 1 for s in values):
        raise ValueError(f"sigmas must be a non-empty list of numbers in (0, 1], got {sigmas!r}")
    return values


@dataclass
class _Request:
    """One call's arguments, checked and normalised."""

    resolution: Resolution
    steps: int
    sigmas: list[float] | None
    guidance: float
    normalization: float
    truncation: float | None
    per_prompt: int
    max_tokens: int
    output_type: str
    tensor_inputs: list[str]
    texts: list[str] | None  # exactly one of texts / embeds is set
    negative_texts: list[str] | None
    embeds: list[torch.Tensor] | None
    negative_embeds: list[torch.Tensor] | None
    images: int

    @property
    def cfg(self) -> bool:
        return self.guidance > 0


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # Z-Image was trained in bf16; CPUs run fp32 best (and the CPU parity tests need it).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(device) -> torch.device:
    """A concrete device: "cuda" becomes "cuda:<current>" so that worker threads use the same GPU."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index in (None, wanted.index))


def _synchronize(*devices: torch.device) -> None:
    for device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(device)


class ZImageTRTPipeline:
    """Text -> image with Z-Image-Turbo, the denoiser running as compiled engines.

    Build it with `from_pretrained` (a diffusers-format folder or hub id) or `from_components`
    (already-loaded diffusers/transformers modules). Calls are serialised by a lock, so one pipeline
    may be shared by threads; `submit` queues work for a single GPU worker thread instead.
    """

    def __init__(
        self,
        *,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        engine_dir=None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_fallback: bool = False,
        text_encoder_device: torch.device | str | None = None,
        use_cuda_graph: bool = True,
        pad_prompts_to_max_length: bool = True,
        telemetry_history: int = 1000,
        stream_priority: int = 0,
        compile_vae: bool | None = None,
        precision: str | None = None,
        weights_fingerprint: str | None = None,
        text_encoder_fp8: bool | None = None,
    ):
        from diffusers.image_processor import VaeImageProcessor

        self.device = _resolve_device(device)
        self.dtype = torch_dtype or _default_dtype(self.device)
        self.engine_dir = engine_dir
        self.allow_fallback = bool(allow_fallback)
        self.use_cuda_graph = use_cuda_graph
        self.stream_priority = int(stream_priority)
        # The engine precision to look for; None = the pipeline dtype's (fp16/bf16/fp32). "fp8" runs
        # FP8 projections with bf16 elsewhere (build with --precision fp8).
        self.precision = precision
        self.weights_fingerprint = weights_fingerprint  # checked against engine manifests when known
        # True (default): pad every prompt to max_sequence_length as diffusers does: bitwise its features.
        # False: run the encoder on the real tokens plus one pad token: far less work for a CPU text
        # encoder, equal features up to rounding (see `_padded_length`).
        self.pad_prompts_to_max_length = pad_prompts_to_max_length
        self.transformer = transformer
        self.latent_channels = int(transformer.config.in_channels)
        self.caption_feature_dim = int(transformer.config.cap_feat_dim)
        # Caption row i has RoPE position 1 + i and the image sits after the caption: both in the table.
        self.max_caption_tokens = int(transformer.config.axes_lens[0]) - 2
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_device = (
            torch.device(text_encoder_device) if text_encoder_device is not None else _module_device(text_encoder)
        )
        self.tokenizer = tokenizer
        # FP8 text encoder: its linear layers in e4m3, in place (from_components may have done it already).
        text_encoder_fp8 = _wants_fp8_text_encoder(text_encoder_fp8, precision, text_encoder, self.text_encoder_device)
        if text_encoder_fp8:
            _check_fp8_device(self.text_encoder_device, "text_encoder_fp8")
            quantize_text_encoder_fp8(text_encoder)
        self.text_encoder_fp8 = bool(text_encoder_fp8)
        self._text_runner = TextEncoderRunner(text_encoder, self.text_encoder_device, use_cuda_graph)
        self.scheduler = scheduler
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        # The VAE decoder is 91 ms eager and 39 ms compiled at 1024x1024 on an H100: compile it on CUDA,
        # one graph per resolution at its first image (from the engine's artefacts when the build had a VAE).
        if compile_vae is None:
            compile_vae = self.device.type == "cuda"
        if compile_vae:
            from .backends.torch_compiled import compile_vae_decoder

            compile_vae_decoder(vae)
        self.telemetry = Telemetry(self.device, history=telemetry_history)
        self.show_progress = True
        self._loops: dict[tuple, Any] = {}
        self._engines: dict[tuple, Any] = {}  # engine files opened once, whatever the number of shapes
        self._lock = threading.RLock()
        self._queue = None
        self._queue_lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model,
        engine_dir=None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_fallback: bool = False,
        text_encoder_device: torch.device | str | None = None,
        **options,
    ) -> "ZImageTRTPipeline":
        """Load the parts from a local diffusers-format folder (or a hub id) with safetensors only.

        `device` defaults to "cuda" when available; `torch_dtype` to bf16 on CUDA and fp32 on CPU.
        `text_encoder_device` puts the text encoder elsewhere (e.g. "cpu" to save GPU memory).
        """
        from .weights import load_pipeline_parts, load_transformer, weights_fingerprint

        device = _resolve_device(device)
        dtype = torch_dtype or _default_dtype(device)
        # Load on the CPU; from_components moves each part once (the text encoder may live elsewhere).
        parts = load_pipeline_parts(model, torch_dtype=dtype, device="cpu")
        # FP8: on the CPU too, so that from_components converts it block by block on its way to the GPU.
        fp8 = options.get("precision") == "fp8"
        transformer = load_transformer(model, torch_dtype=dtype, device="cpu" if fp8 else device)
        if engine_dir is not None:
            # Same digest as the build's when it built from these files (stored dtype, sampled bytes):
            # an engine with other weights baked in is refused instead of silently used.
            options.setdefault("weights_fingerprint", weights_fingerprint(model))
        return cls.from_components(
            transformer, **parts, engine_dir=engine_dir, device=device, torch_dtype=dtype,
            allow_fallback=allow_fallback, text_encoder_device=text_encoder_device, **options,
        )

    @classmethod
    def from_components(
        cls,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        engine_dir=None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_fallback: bool = False,
        text_encoder_device: torch.device | str | None = None,
        **options,
    ) -> "ZImageTRTPipeline":
        """Wrap already-loaded components (e.g. a diffusers pipeline's); they are moved, not copied."""
        device = _resolve_device(device)
        dtype = torch_dtype or _default_dtype(device)
        te_device = torch.device(text_encoder_device or device)
        if options.get("precision") == "fp8" and device.type == "cuda":
            # Convert to FP8 on the way to the GPU, one block at a time: the 16-bit model (19 GiB with its
            # text encoder) never sits whole on the card, so the FP8 pipeline loads on a 16 GB one.
            from .denoiser import quantize_block_fp8

            _place_converting(transformer, _transformer_blocks(transformer), device, quantize_block_fp8)
            if _wants_fp8_text_encoder(options.get("text_encoder_fp8"), "fp8", text_encoder, te_device):
                _place_converting(text_encoder, getattr(text_encoder, "layers", []), te_device, quantize_text_encoder_fp8)
        _move(transformer, device, dtype)
        _move(vae, device, dtype)
        _move(text_encoder, te_device, dtype)
        return cls(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            engine_dir=engine_dir,
            device=device,
            torch_dtype=dtype,
            allow_fallback=allow_fallback,
            text_encoder_device=text_encoder_device,
            **options,
        )

    def set_progress_bar_config(self, disable: bool = False, **_ignored) -> None:
        """diffusers-compatible switch for the per-step progress bar."""
        self.show_progress = not disable

    # -- 1. text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
        """One [L_i, F] tensor per prompt: the encoder's second-to-last hidden states of the real tokens."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer; pass prompt_embeds instead of prompt")
        with self._lock:  # the text encoder's graph output is shared: one encoding at a time
            return self._encode_prompt(prompts, max_sequence_length)

    def _encode_prompt(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        texts = [self._chat_text(p) for p in prompts]
        lengths = self._token_counts(texts)
        _warn_if_truncated(lengths, max_sequence_length, getattr(self.tokenizer, "truncation_side", "right"))
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self._padded_length(lengths, max_sequence_length),
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.text_encoder_device)
        mask = tokens.attention_mask.to(self.text_encoder_device).bool()
        hidden = self._text_runner.hidden_states(input_ids, mask)  # (a CUDA graph's output: copied below)
        if not torch.isfinite(hidden[mask]).all():
            raise NonFiniteOutputError(
                f"the text encoder produced NaN/inf features ({hidden.dtype}); run it in bfloat16 or float32"
            )
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def _chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    def _token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False).input_ids]

    def _padded_length(self, lengths: list[int], max_sequence_length: int) -> int:
        """How many tokens to run the encoder on (real tokens are always the first ones: right padding).

        With causal attention, padding never reaches the real tokens, so fewer pad tokens leave their
        features mathematically unchanged. Numerically, kernels chosen by sequence length may round
        differently. Measured with a full-size random Qwen3-4B in bf16 on an H100: with no pad token at
        all, transformers drops the mask and SDPA's `is_causal` kernel differs by up to 1.4 (features of
        magnitude ~45), hence the one pad token kept; with it, 160- and 300-token prompts were bitwise
        equal to padding to 512, a 38-token prompt still differed by up to 1.25. And eagerly the encoder
        took 45-55 ms whatever the length (launch-bound); replayed from a CUDA graph it takes 15 ms at
        512 tokens, and one graph serves every prompt when all are padded alike: so the GPU default is
        diffusers' full padding.
        On a CPU (fp32) the short form differs by ~1e-6 and saves most of the work.
        Left padding would shift the real tokens' positions, so it always keeps the full padding.
        """
        full = self.pad_prompts_to_max_length or getattr(self.tokenizer, "padding_side", "right") != "right"
        return max_sequence_length if full else min(max_sequence_length, max(lengths) + 1)

    # -- 2. latents ------------------------------------------------------------------------------
    def latent_shape(self, images: int, resolution: Resolution) -> tuple[int, int, int, int]:
        # diffusers: 2 * (side // (vae_scale * 2)) latent pixels, i.e. side / 8 for sides that are multiples of 16.
        scale = self.image_processor.config.vae_scale_factor
        return (images, self.latent_channels, 2 * (resolution.height // scale), 2 * (resolution.width // scale))

    def prepare_latents(self, images: int, resolution: Resolution, generator, latents=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(images, resolution)
        if latents is not None:
            return _check_latents(latents, shape).to(self.device, torch.float32)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    # -- 3. schedule -----------------------------------------------------------------------------
    def schedule(self, num_inference_steps: int, latents: torch.Tensor, sigmas: list[float] | None = None):
        """(timesteps, sigmas) from diffusers' scheduler, set up exactly as `ZImagePipeline` does."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = self.scheduler.config
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
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
    def denoise_loop(self, resolution: Resolution, images: int, cfg: bool):
        """The runtime loop for this shape; engines and loops are opened once and reused."""
        from .engines import open_denoiser
        from .runtime import DenoiseLoop

        # CFG runs the conditional and unconditional halves as one engine batch.
        model_batch = images * (2 if cfg else 1)
        key = (resolution, model_batch)
        if key not in self._loops:
            engine = open_denoiser(
                self.transformer,
                self.engine_dir,
                self.device,
                self.dtype,
                resolution.key,
                model_batch,
                allow_fallback=self.allow_fallback,
                precision=self.precision,
                cache=self._engines,
                weights_fingerprint=self.weights_fingerprint,
            )
            # One engine may serve several shapes (optimisation profiles); keep one loop per engine.
            loop = next((known for known in self._loops.values() if known.engine is engine), None)
            self._loops[key] = loop or DenoiseLoop(
                engine, self.device, use_cuda_graph=self.use_cuda_graph, stream_priority=self.stream_priority
            )
        return self._loops[key]

    # -- 5. image --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        latents = latents.to(self.vae.device, self.vae.dtype)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if not torch.isfinite(image).all():
            raise NonFiniteOutputError(
                f"the VAE decoder produced NaN/inf pixels ({self.vae.dtype}); the latents were finite, so the "
                f"decoder overflowed: run the VAE in bfloat16 or float32"
            )
        if output_type == "pil" and image.is_cuda and image.shape[1] == 3:
            return _to_pil_on_gpu(self.image_processor.postprocess(image, output_type="pt"))
        return self.image_processor.postprocess(image, output_type=output_type)

    # -- the call --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = DEFAULT_SIDE,
        width: int | None = DEFAULT_SIDE,
        num_inference_steps: int = TURBO_STEPS,
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
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        sigmas: list[float] | None = None,
    ) -> ZImageTRTPipelineOutput:
        """Generate images. Same arguments as diffusers' `ZImagePipeline.__call__`, with Turbo's defaults
        (8 steps, guidance 0); the output also carries `.timings` (ms per stage and per step).

        Every argument is checked before any work starts; a bad one raises ValueError/TypeError naming
        the argument, its value and the rule.
        """
        started = time.perf_counter()
        request = self._check_request(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps,
            sigmas, guidance_scale, cfg_normalization, cfg_truncation, num_images_per_prompt, max_sequence_length,
            output_type, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )
        _check_generator(generator, request.images)
        if latents is not None:
            _check_latents(latents, self.latent_shape(request.images, request.resolution))
        with self._lock, self._on_device():
            timings = Timings(num_images=request.images)
            try:
                images = self._generate(request, generator, latents, callback_on_step_end, timings)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                self._release_after_oom(request, error)
                raise GenerationOOMError(_oom_message(request, self.device, error)) from error
            timings.total_ms = (time.perf_counter() - started) * 1000.0
        self.telemetry.record(timings)
        return ZImageTRTPipelineOutput(images=images, timings=timings)

    def _generate(self, request: "_Request", generator, latents, callback, timings: Timings):
        """Steps 1-5 for checked arguments; fills `timings` as it goes."""
        with self._stage(timings, "text_encode_ms", self.text_encoder_device):
            positive, negative = self._text_embeddings(request)
        initial = self.prepare_latents(request.images, request.resolution, generator, latents)
        timesteps, sigmas = self.schedule(request.steps, initial, request.sigmas)
        loop = self.denoise_loop(request.resolution, request.images, request.cfg)
        step_callback = self._step_callback(callback, request.tensor_inputs, timings)
        with self._stage(timings, "denoise_ms"):
            final = loop(
                initial,
                positive,
                negative,
                timesteps,
                sigmas,
                guidance_scale=request.guidance,
                cfg_normalization=request.normalization,
                cfg_truncation=request.truncation,
                callback=step_callback,
                progress=self.show_progress,
            )
        if self.device.type == "cuda":  # the loop timed each step with CUDA events
            timings.step_ms = list(loop.last_step_times_ms)
        _check_finite_latents(final, self.dtype)
        with self._stage(timings, "vae_decode_ms"):
            return self.decode_latents(final, request.output_type)

    def _release_after_oom(self, request: "_Request", error: BaseException) -> None:
        """Leave nothing half-made after an out-of-memory error, and give the memory back.

        - the failed call's intermediates: the error's traceback keeps every frame it passed through,
          and their tensors, alive for as long as the caller (or a Future) holds the error: clear them;
        - the loop's buffers and graph for this shape: a step or a graph capture may have stopped half
          way; drop them (other shapes' are untouched) so that the next call of this shape makes fresh ones;
        - the allocator's cache: return the freed blocks to the device.
        """
        seen = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        shape = self.latent_shape(request.images, request.resolution)
        for loop in {id(loop): loop for loop in self._loops.values()}.values():
            loop.discard_slots(shape)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _text_embeddings(self, request: "_Request"):
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

    def _check_request(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps,
        sigmas, guidance_scale, cfg_normalization, cfg_truncation, num_images_per_prompt, max_sequence_length,
        output_type, callback, tensor_inputs,
    ) -> "_Request":
        resolution = Resolution(*_check_size(height, width))
        steps = _check_int("num_inference_steps", num_inference_steps, 1)
        sigmas = _check_sigmas(sigmas)
        guidance = _check_real("guidance_scale", guidance_scale, minimum=0.0)
        max_tokens = _check_int("max_sequence_length", max_sequence_length, 1)
        if max_tokens > self.max_caption_tokens:
            raise ValueError(
                f"max_sequence_length={max_tokens} exceeds the {self.max_caption_tokens} caption tokens this "
                f"transformer's RoPE table holds"
            )
        texts, negative_texts, embeds, negative_embeds = self._check_text_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, cfg=guidance > 0
        )
        per_prompt = _check_int("num_images_per_prompt", num_images_per_prompt, 1)
        return _Request(
            resolution=resolution,
            steps=len(sigmas) if sigmas is not None else steps,
            sigmas=sigmas,
            guidance=guidance,
            normalization=_check_cfg_normalization(cfg_normalization),
            truncation=None if cfg_truncation is None else _check_real("cfg_truncation", cfg_truncation),
            per_prompt=per_prompt,
            max_tokens=max_tokens,
            output_type=_check_output_type(output_type),
            tensor_inputs=_check_callback(callback, tensor_inputs),
            texts=texts,
            negative_texts=negative_texts,
            embeds=embeds,
            negative_embeds=negative_embeds,
            images=len(texts if texts is not None else embeds) * per_prompt,
        )

    def _check_text_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, cfg: bool):
        """(prompts, negative prompts, prompt embeddings, negative embeddings): texts or embeddings per side."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                "pass exactly one of prompt and prompt_embeds, got " + ("both" if prompt is not None else "neither")
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds, got both")
        texts = _check_prompts("prompt", prompt) if prompt is not None else None
        embeds = self._check_embeddings("prompt_embeds", prompt_embeds) if texts is None else None
        count = len(texts if texts is not None else embeds)
        negatives = _check_negative_prompts(negative_prompt, count)
        negative_embeds = None
        if negative_prompt_embeds is not None:
            negative_embeds = self._check_embeddings("negative_prompt_embeds", negative_prompt_embeds)
            if len(negative_embeds) != count:
                raise ValueError(
                    f"negative_prompt_embeds has {len(negative_embeds)} entries but there are {count} prompts; "
                    f"pass one per prompt"
                )
        if cfg and negatives is None and negative_embeds is None:
            if texts is None:
                raise ValueError("guidance_scale > 0 with prompt_embeds needs negative_prompt_embeds (or negative_prompt)")
            negatives = [""] * count  # diffusers' default negative prompt
        return texts, negatives, embeds, negative_embeds

    def _check_embeddings(self, name: str, embeds) -> list[torch.Tensor]:
        return _check_embeddings(name, embeds, self.caption_feature_dim, self.max_caption_tokens)

    def _step_callback(self, callback, tensor_inputs: list[str], timings: Timings):
        """Adapts diffusers' `callback_on_step_end(pipe, i, t, kwargs)` to the loop's `callback(i, t, latents)`.

        On CPU it also times each step (on CUDA the loop times steps with events, without syncing).
        """
        timing_steps = self.device.type != "cuda"
        if callback is None and not timing_steps:
            return None
        last = [time.perf_counter()]

        def on_step(index: int, timestep: torch.Tensor, latents: torch.Tensor):
            replaced = None
            if callback is not None:
                # The loop's latents are a reused buffer; a callback that keeps them must see this step's values.
                current = latents.clone()
                kwargs = {name: current for name in tensor_inputs}
                outputs = callback(self, index, timestep, kwargs)
                outputs = {} if outputs is None else outputs
                if not isinstance(outputs, Mapping):
                    raise TypeError(
                        f"callback_on_step_end must return a dict (or None), got {type(outputs).__name__} at step {index}"
                    )
                replaced = outputs.get("latents", current if "latents" in tensor_inputs else None)
                if replaced is not None and replaced is not current and (
                    not isinstance(replaced, torch.Tensor) or replaced.shape != current.shape
                ):
                    got = f"shape {tuple(replaced.shape)}" if isinstance(replaced, torch.Tensor) else type(replaced).__name__
                    raise ValueError(
                        f"callback_on_step_end returned latents of {got} at step {index}; "
                        f"expected a tensor of shape {tuple(current.shape)}"
                    )
            if timing_steps:
                now = time.perf_counter()
                timings.step_ms.append((now - last[0]) * 1000.0)
                last[0] = now
            return replaced

        return on_step

    @contextlib.contextmanager
    def _stage(self, timings: Timings, name: str, *devices: torch.device):
        """Adds the stage's wall time to `timings.<name>`; syncs the GPU so the time is the work's, not the launch's."""
        start = time.perf_counter()
        yield
        _synchronize(self.device, *devices)
        setattr(timings, name, getattr(timings, name) + (time.perf_counter() - start) * 1000.0)

    def _on_device(self):
        # A worker thread starts on CUDA device 0; make ours current for the whole call.
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- serving and statistics ------------------------------------------------------------------
    def submit(self, **kwargs):
        """Queue a generation for the pipeline's single GPU worker thread; returns a Future."""
        from .queue import GenerationQueue

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

    def __enter__(self) -> "ZImageTRTPipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_size(height, width) -> tuple[int, int]:
    height = DEFAULT_SIDE if height is None else height
    width = DEFAULT_SIDE if width is None else width
    check_side("height", height)
    check_side("width", width)
    return height, width


def _repeat_per_image(embeds: list[torch.Tensor] | None, per_prompt: int) -> list[torch.Tensor] | None:
    # diffusers' order: all images of prompt 0, then of prompt 1, ...
    if embeds is None:
        return None
    return [e for e in embeds for _ in range(per_prompt)]


def _warn_if_truncated(lengths: list[int], max_sequence_length: int, side: str) -> None:
    end = "first" if side == "left" else "last"
    for i, length in enumerate(lengths):
        if length > max_sequence_length:
            warnings.warn(
                f"prompt {i} is {length} tokens long (chat template included) but max_sequence_length="
                f"{max_sequence_length}: the {end} {length - max_sequence_length} tokens were dropped",
                PromptTruncatedWarning,
                stacklevel=2,
            )


def _is_out_of_memory(error: BaseException | None) -> bool:
    """torch's OOM error, anywhere in the chain (a failed graph capture may raise another error on top)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return True
        if isinstance(error, RuntimeError) and any(
            text in str(error)
            for text in ("CUDA out of memory", "CUDA error: out of memory", "_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _oom_message(request: "_Request", device: torch.device, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    detail = (lines[0] if lines else type(error).__name__)[:300]
    size = f"{request.resolution.height}x{request.resolution.width}"
    advice = []
    if request.images > 1:
        advice.append(f"fewer images per call (this one made {request.images}: lower num_images_per_prompt "
                      f"or pass fewer prompts)")
    advice.append(f"a smaller size than {size}")
    if request.cfg:
        advice.append("guidance_scale=0 (CFG doubles the denoiser batch)")
    advice.append("or free the memory other processes hold on the device")
    return (
        f"out of memory (OOM) on {device} while generating {request.images} image(s) at {size}: {detail}. "
        f"Retry with {'; '.join(advice)}. The request's buffers were released; the pipeline remains usable."
    )


def _check_finite_latents(latents: torch.Tensor, dtype: torch.dtype) -> None:
    if torch.isfinite(latents).all():
        return
    bad = [i for i in range(latents.shape[0]) if not torch.isfinite(latents[i]).all()]
    hint = " (fp16 overflow: use bf16 or an engine built with fp16 downscaling)" if dtype == torch.float16 else ""
    raise NonFiniteOutputError(f"denoising produced NaN/inf latents for image(s) {bad}{hint}; no image was decoded")


def _wants_fp8_text_encoder(flag, precision: str | None, text_encoder, device: torch.device) -> bool:
    """`text_encoder_fp8` checked; None follows the denoiser: FP8 when precision is "fp8" on a GPU."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"text_encoder_fp8 must be True, False or None (follow the denoiser), got {flag!r}")
    if flag is None:
        return precision == "fp8" and text_encoder is not None and device.type == "cuda"
    return flag


def _transformer_blocks(transformer) -> list:
    return [block for group in ("noise_refiner", "context_refiner", "layers") for block in getattr(transformer, group, [])]


def _place_converting(module, blocks, device: torch.device, convert) -> None:
    """Move each of `blocks` (submodules of `module`) to `device` in bf16 and `convert` it there at once,
    so that only one block's 16-bit weights are on the GPU at a time; the rest moves afterwards."""
    _check_fp8_device(device, "precision='fp8'")
    for block in blocks:
        _move(block, device, torch.bfloat16)  # (FP8-aware: a block converted earlier keeps its FP8 layers)
        convert(block)  # (skips layers converted earlier)


def _check_fp8_device(device: torch.device, option: str) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{option} needs FP8 tensor cores (compute capability 8.9 or newer); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


def _to_pil_on_gpu(image: torch.Tensor) -> list:
    """diffusers' numpy_to_pil (x * 255, round half to even, uint8) done on the GPU in float32: bitwise
    the same images, and a quarter of the bytes cross to the host (7 vs 14 ms at 1024x1024, H100)."""
    from PIL import Image

    pixels = image.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in pixels]


def _module_device(module) -> torch.device:
    if module is None:
        return torch.device("cpu")
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _move(module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)` only when needed (diffusers warns about every cast, even a no-op one).

    FP8 layers (of a module an FP8 pipeline already converted) keep their dtypes: e4m3 weights and
    float32 scales that `module.to(dtype)` would turn into 16-bit numbers the layers then misread.
    """
    from .denoiser import Fp8Linear

    if module is None:
        return
    fp8_layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    kept = {id(t) for m in fp8_layers for t in [*m.parameters(), *m.buffers()]}
    tensors = [*module.parameters(), *module.buffers()]
    moves = any(not _same_device(t.device, device) for t in tensors)
    casts = any(t.is_floating_point() and t.dtype != dtype and id(t) not in kept for t in tensors)
    if not fp8_layers:
        if moves or casts:
            module.to(device=device, dtype=dtype)  # one call: no wide copy lands on the device before the cast
        return
    if moves:
        module.to(device=device)
    if casts:
        for sub in module.modules():
            if isinstance(sub, Fp8Linear):
                continue
            for param in sub.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    sub._buffers[name] = buffer.to(dtype)
