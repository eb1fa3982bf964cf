"""Tiny, random, offline Z-Image-Turbo components built from the *real* classes.

Used by tests, the offline demo and CI: nothing here touches a model hub. Every
component is the same class the real checkpoint uses (diffusers
``ZImageTransformer2DModel`` / ``AutoencoderKL`` / ``FlowMatchEulerDiscreteScheduler``,
transformers ``Qwen3Model`` and a fast tokenizer), only with tiny widths, so code
paths (shapes, dtypes, export, loading) are exercised exactly as with the 6B model.

Weights are drawn from a private ``torch.Generator`` seeded with ``seed``: the same
seed gives bit-identical weights regardless of the global RNG, which is left
untouched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

# Tiny sizes. The text encoder's hidden size feeds the transformer's cap_feat_dim.
TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 2  # the pipeline takes hidden_states[-2], so >= 2 layers matter
TINY_MAX_POSITIONS = 1024  # pipeline pads prompts to max_sequence_length=512

# Qwen's special tokens, with Qwen's roles: <|endoftext|> pads, <|im_end|> ends a turn.
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Z-Image-Turbo's scheduler/scheduler_config.json (the Turbo model uses a fixed shift;
# the pipeline passes `mu` but it is ignored when dynamic shifting is off).
ZIMAGE_TURBO_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

# Same behaviour as Qwen3's template for a plain chat: each turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an
# assistant turn, and enable_thinking=False pre-fills an empty think block.
QWEN3_LIKE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def tiny_transformer_config() -> dict:
    """Config dict for a tiny ``ZImageTransformer2DModel`` (real defaults are dim=3840, 30 layers)."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 64,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": TINY_TEXT_HIDDEN,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [8, 12, 12],  # sums to head_dim = 64 / 2; each even for complex RoPE
        "axes_lens": [1024, 512, 512],
    }


def tiny_vae_config() -> dict:
    """Config dict for a tiny ``AutoencoderKL`` shaped like Z-Image's (Flux-style) VAE.

    Four blocks give the real spatial factor of 8; 16 latent channels, no quant convs,
    and the real scaling/shift factors so latent normalisation code is exercised.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": 4,
        "sample_size": 256,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def tiny_text_encoder_config(vocab_size: int) -> dict:
    """Kwargs for a tiny ``Qwen3Config``; ``vocab_size`` must equal ``len(tokenizer)``."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": TINY_TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": TINY_TEXT_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,  # grouped-query attention, as in the real encoder
        "head_dim": 16,  # Qwen3Config defaults to 128 regardless of hidden_size
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 style printable stand-in character for every byte value.

    This is the mapping ``tokenizers``' ByteLevel pre-tokenizer applies, so a BPE
    vocabulary of these 256 characters can spell any UTF-8 string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def make_tiny_tokenizer():
    """A byte-level BPE fast tokenizer with Qwen's special tokens and chat template.

    Token id ``b`` (0..255) is byte ``b``; the five special tokens follow (ids 256..260).
    No merges: every prompt, including unicode and the empty string, tokenizes.
    Built entirely in memory, so it works offline and round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token="<|im_end|>",
        model_max_length=TINY_MAX_POSITIONS,
    )
    tokenizer.chat_template = QWEN3_LIKE_CHAT_TEMPLATE
    return tokenizer


@torch.no_grad()
def _randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter with seeded noise, in sorted-name order.

    Z-Image's pad tokens start as zeros and some models zero-init their output heads,
    which would make outputs trivially zero or seed-independent. Instead: matrices and
    conv kernels ~ N(0, 1/fan_in) (keeps activations at unit scale through the tiny
    nets), biases and other 1-D params ~ N(0, 0.02), norm scales exactly 1.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
    norm_scales = set()
    for mod_name, mod in module.named_modules():
        # RMSNorm classes differ per library; detect them by name.
        if isinstance(mod, norm_types) or "RMSNorm" in type(mod).__name__:
            if getattr(mod, "weight", None) is not None:
                norm_scales.add(f"{mod_name}.weight" if mod_name else "weight")

    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if name in norm_scales:
            values = torch.ones(param.shape)
        elif param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
        else:
            values = torch.randn(param.shape, generator=generator) * 0.02
        param.copy_(values.to(param.dtype))


def make_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32, transformer_config: dict | None = None) -> dict:
    """Tiny random ``ZImagePipeline`` components: transformer, vae, text_encoder, tokenizer, scheduler.

    Deterministic in ``seed``; the global torch RNG state is preserved. ``transformer_config`` overrides
    entries of `tiny_transformer_config()` (e.g. FP8_GPU_TINY).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_tiny_tokenizer()
    generator = torch.Generator().manual_seed(seed)

    # Module constructors run their default init on the global RNG; fork it so that
    # building tiny models has no side effect on the caller's randomness.
    with torch.random.fork_rng(devices=[]):
        transformer = ZImageTransformer2DModel(**{**tiny_transformer_config(), **(transformer_config or {})})
        vae = AutoencoderKL(**tiny_vae_config())
        text_config = Qwen3Config(
            **tiny_text_encoder_config(len(tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text_encoder = Qwen3Model(text_config)

    # A fixed order so each model's weights depend only on the seed.
    for model in (transformer, vae, text_encoder):
        _randomize_(model, generator)
        model.eval()
        if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
            model.to(dtype)

    scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER_CONFIG)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def make_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, transformer_config: dict | None = None):
    """An in-memory ``diffusers.ZImagePipeline`` over :func:`make_tiny_components`."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(**make_tiny_components(seed=seed, dtype=dtype, transformer_config=transformer_config))


def save_tiny_pipeline(
    path: str | os.PathLike,
    seed: int = 0,
    shard_size: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    transformer_config: dict | None = None,
) -> Path:
    """Write a diffusers-format tiny pipeline folder (safetensors only) and return its path.

    The folder has model_index.json and transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/, and loads offline with ``diffusers.ZImagePipeline.from_pretrained(path)``.
    ``shard_size`` (e.g. ``"50KB"``) re-saves the transformer as several
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` files plus an index json,
    the layout of the real checkpoint.
    """
    path = Path(path)
    pipe = make_tiny_pipeline(seed=seed, dtype=dtype, transformer_config=transformer_config)
    pipe.save_pretrained(path, safe_serialization=True)

    if shard_size is not None:
        # Only the transformer is sharded: replace its single file by shards + index.
        transformer_dir = path / "transformer"
        for old in transformer_dir.glob("diffusion_pytorch_model*.safetensors*"):
            old.unlink()
        pipe.transformer.save_pretrained(transformer_dir, safe_serialization=True, max_shard_size=shard_size)
    return path


# Widths whose FP8 products the GPU can run (torch._scaled_mm wants every dimension divisible by 16;
# the default tiny feed-forward is 170 wide): dim 192 -> feed-forward 512, 3 heads of 64.
FP8_GPU_TINY = {"dim": 192, "n_heads": 3, "n_kv_heads": 3, "axes_dims": [16, 24, 24]}


def make_tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A tiny random ``ZImageTransformer2DModel`` with `config` overriding `tiny_transformer_config()`."""
    from diffusers import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        model = ZImageTransformer2DModel(**{**tiny_transformer_config(), **config})
    _randomize_(model, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval().requires_grad_(False)


def tiny_controlnet_config(variant: str | None = None, control_in_dim: int = 16, transformer_config: dict | None = None,
                           **overrides) -> dict:
    """Config of a tiny ``ZImageControlNetModel`` that fits the tiny transformer: Union v1 (`variant` None:
    its own noise refiner), 2.0 ("control_layers") or 2.1 ("control_noise_refiner"); 16 control channels
    (a control image) or 33 (control image + mask + masked image: inpainting)."""
    t = {**tiny_transformer_config(), **(transformer_config or {})}
    config = {
        "control_layers_places": list(range(t["n_layers"])),
        "control_refiner_layers_places": list(range(t["n_refiner_layers"])) if variant else [],
        "control_in_dim": control_in_dim,
        "add_control_noise_refiner": variant,
        "all_patch_size": tuple(t["all_patch_size"]),
        "all_f_patch_size": tuple(t["all_f_patch_size"]),
        "dim": t["dim"],
        "n_refiner_layers": 2 if variant == "control_noise_refiner" else t["n_refiner_layers"],
        "n_heads": t["n_heads"],
        "n_kv_heads": t["n_kv_heads"],
        "norm_eps": t["norm_eps"],
        "qk_norm": t["qk_norm"],
    }
    return {**config, **overrides}


def make_tiny_controlnet(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A tiny random ``ZImageControlNetModel`` (`config` as `tiny_controlnet_config`). Every weight random,
    the zero-initialised before/after projections too: with diffusers' zeros every hint would be 0."""
    from diffusers import ZImageControlNetModel

    with torch.random.fork_rng(devices=[]):
        model = ZImageControlNetModel(**tiny_controlnet_config(**config))
    _randomize_(model, torch.Generator().manual_seed(seed))
    if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
        model.to(dtype)
    return model.eval().requires_grad_(False)
