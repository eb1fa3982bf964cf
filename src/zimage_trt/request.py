"""A call's arguments, checked before any work starts and gathered into one `Request`.

Each check names the argument, the value it got and the rule it broke (ValueError / TypeError), so a bad
call fails at once with a message that says what would be right, and leaves the pipeline untouched.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .model.shapes import LATENT_CHANNELS, Resolution, check_fits_rope

DEFAULT_SIDE = 1024
TURBO_STEPS = 8
TURBO_GUIDANCE = 0.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # diffusers pads and truncates prompts to this many tokens
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The loop keeps prompt embeddings in engine buffers, so a step callback may read and replace only latents.
CALLBACK_TENSOR_INPUTS = ("latents",)


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


def check_attention_kwargs(joint_attention_kwargs, attention_kwargs) -> None:
    """diffusers' Z-Image transformer reads one entry of these, "scale" (the LoRA scale of this call).
    Engines run weights with the adapters already merged, so only the neutral scale 1.0 is honoured."""
    if joint_attention_kwargs is not None and attention_kwargs is not None:
        raise ValueError("pass at most one of joint_attention_kwargs and attention_kwargs (the same thing), got both")
    name = "joint_attention_kwargs" if joint_attention_kwargs is not None else "attention_kwargs"
    kwargs = joint_attention_kwargs if joint_attention_kwargs is not None else attention_kwargs
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise TypeError(f"{name} must be a dict such as {{'scale': 1.0}} or None, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - {"scale"})
    if unknown:
        raise ValueError(f"{name} may hold only 'scale' (the only entry Z-Image's transformer reads), got {unknown}")
    scale = _check_real(f"{name}['scale']", kwargs.get("scale", 1.0))
    if scale != 1.0:
        raise ValueError(
            f"{name}['scale']={scale}: a per-call LoRA scale is not supported (engines run merged weights); "
            f"set it before the call with set_adapters(names, adapter_weights=...) or fuse_lora(lora_scale=...)"
        )


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
class Request:
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


@dataclass(frozen=True)
class RequestLimits:
    """What the loaded model accepts: the text features' width, caption tokens, and the latent layout."""

    caption_feature_dim: int
    max_caption_tokens: int
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel times the patch size (diffusers' image processor factor)
    rope_axes_lens: tuple[int, ...] = (1536, 512, 512)  # the transformer's RoPE table lengths (config.axes_lens)

    def latent_shape(self, images: int, resolution: Resolution) -> tuple[int, int, int, int]:
        # diffusers: 2 * (side // (vae_scale * 2)) latent pixels, i.e. side / 8 for sides that are multiples of 16.
        scale = self.vae_scale_factor
        return (images, self.latent_channels, 2 * (resolution.height // scale), 2 * (resolution.width // scale))


def check_request(
    limits: RequestLimits, *, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
    num_inference_steps, sigmas, guidance_scale, cfg_normalization, cfg_truncation, num_images_per_prompt,
    max_sequence_length, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, generator, latents,
) -> Request:
    """Every argument of a call checked and normalised (keyword names as diffusers' `__call__`)."""
    resolution = Resolution(DEFAULT_SIDE if height is None else height, DEFAULT_SIDE if width is None else width)
    check_fits_rope(resolution, limits.rope_axes_lens, limits.vae_scale_factor)
    steps = _check_int("num_inference_steps", num_inference_steps, 1)
    sigmas = _check_sigmas(sigmas)
    guidance = _check_real("guidance_scale", guidance_scale, minimum=0.0)
    max_tokens = _check_int("max_sequence_length", max_sequence_length, 1)
    texts, negative_texts, embeds, negative_embeds = _check_text_inputs(
        limits, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, cfg=guidance > 0
    )
    # It bounds what the tokenizer keeps: it matters only where a text is tokenised (diffusers ignores it
    # for prompt_embeds, whose lengths are checked against the table themselves).
    tokenising = texts is not None or negative_texts is not None
    if tokenising and max_tokens > limits.max_caption_tokens:
        raise ValueError(
            f"max_sequence_length={max_tokens} exceeds the {limits.max_caption_tokens} caption tokens this "
            f"transformer's RoPE table holds; pass max_sequence_length <= {limits.max_caption_tokens}"
        )
    per_prompt = _check_int("num_images_per_prompt", num_images_per_prompt, 1)
    images = len(texts if texts is not None else embeds) * per_prompt
    _check_generator(generator, images)
    if latents is not None:
        _check_latents(latents, limits.latent_shape(images, resolution))
    return Request(
        resolution=resolution,
        steps=len(sigmas) if sigmas is not None else steps,
        sigmas=sigmas,
        guidance=guidance,
        normalization=_check_cfg_normalization(cfg_normalization),
        truncation=None if cfg_truncation is None else _check_real("cfg_truncation", cfg_truncation),
        per_prompt=per_prompt,
        max_tokens=max_tokens,
        output_type=_check_output_type(output_type),
        tensor_inputs=_check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs),
        texts=texts,
        negative_texts=negative_texts,
        embeds=embeds,
        negative_embeds=negative_embeds,
        images=images,
    )


def _check_text_inputs(limits: RequestLimits, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, cfg: bool):
    """(prompts, negative prompts, prompt embeddings, negative embeddings): texts or embeddings per side."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError(
            "pass exactly one of prompt and prompt_embeds, got " + ("both" if prompt is not None else "neither")
        )
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds, got both")
    dim, max_tokens = limits.caption_feature_dim, limits.max_caption_tokens
    texts = _check_prompts("prompt", prompt) if prompt is not None else None
    embeds = _check_embeddings("prompt_embeds", prompt_embeds, dim, max_tokens) if texts is None else None
    count = len(texts if texts is not None else embeds)
    negatives = _check_negative_prompts(negative_prompt, count)
    negative_embeds = None
    if negative_prompt_embeds is not None:
        negative_embeds = _check_embeddings("negative_prompt_embeds", negative_prompt_embeds, dim, max_tokens)
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
