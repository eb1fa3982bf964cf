"""Reading a LoRA: diffusers' own loading and key conversion, then factors per layer of our transformer.

`ZImageLoraLoaderMixin.lora_state_dict` (diffusers) fetches the file (safetensors only here), and turns
the non-diffusers layouts it knows (kohya `lora_unet_*`, `diffusion_model.*`, `.alpha` scaling,
`lora_down`/`lora_up`, ...) into diffusers' `transformer.<module>.lora_A/B.weight`. What it leaves in
another layout is refused here, naming a few of the keys that match no layer, rather than silently
dropped. The scale of each layer is PEFT's `lora_alpha / r` (rank and alpha patterns from the
adapter's metadata, matched by PEFT's own `get_pattern_key`; no metadata means alpha = r, as diffusers
assumes).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model.fp8 import Fp8Linear

PREFIX = "transformer."
DOWN, UP = ".lora_A.weight", ".lora_B.weight"
SHOWN_KEYS = 5


class LoraError(ValueError):
    """An adapter that cannot be read or does not fit this transformer; the message says why."""


@dataclass
class LoraLayer:
    down: torch.Tensor  # lora_A [r, in_features]
    up: torch.Tensor  # lora_B [out_features, r]
    scale: float  # PEFT's scaling: lora_alpha / r (or / sqrt(r) with rsLoRA)


_serials = itertools.count()


@dataclass
class Adapter:
    name: str
    layers: dict[str, LoraLayer]  # diffusers module name (e.g. "layers.3.attention.to_q") -> factors
    serial: int = field(default_factory=lambda: next(_serials))  # unique per loaded adapter (hotswap)


def _check_source_is_safetensors(source, weight_name) -> None:
    """Refuse anything that would make diffusers fall back to a pickle."""
    if weight_name is not None and not str(weight_name).endswith(".safetensors"):
        raise LoraError(f"weight_name={weight_name!r}: only .safetensors LoRA files are read (a pickle can run "
                        "arbitrary code when loaded); convert it to safetensors in an environment you trust")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file() and path.suffix != ".safetensors":
            raise LoraError(f"{path}: only .safetensors LoRA files are read (a pickle can run arbitrary code when "
                            "loaded); convert it to safetensors in an environment you trust")
        if path.is_dir() and weight_name is None and not any(path.glob("*.safetensors")):
            raise LoraError(f"{path}: no *.safetensors file in this folder (pass weight_name= to pick one; "
                            "pickled .bin/.pt files are never read)")


def read_state_dict(source, weight_name=None, **kwargs) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(diffusers-layout state dict, LoRA metadata or None) through diffusers' Z-Image LoRA loader."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    if isinstance(source, dict):
        source = dict(source)  # diffusers' conversion pops keys: leave the caller's dict alone
    elif not isinstance(source, (str, os.PathLike)):
        raise LoraError(f"a LoRA is a .safetensors file, a folder holding one (with weight_name=), a hub id or a "
                        f"{{name: tensor}} dict; got {type(source).__name__}")
    else:
        _check_source_is_safetensors(source, weight_name)
        source = os.fspath(source)
    kwargs.pop("use_safetensors", None)
    kwargs.pop("return_lora_metadata", None)
    try:
        state_dict, metadata = ZImageLoraLoaderMixin.lora_state_dict(
            source, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True, **kwargs)
    except LoraError:
        raise
    except Exception as error:  # missing file, corrupt header, offline hub...
        raise LoraError(f"cannot read the LoRA {source if isinstance(source, str) else '(dict)'}: {error}") from error
    return state_dict, metadata


def _peft_config(metadata: dict | None) -> dict:
    """The LoraConfig fields that set the scale, from diffusers' metadata (keys prefixed "transformer.")."""
    if not metadata:
        return {}
    config = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    return config or dict(metadata)


def _layer_scale(config: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    if not config:
        return 1.0  # no alpha anywhere: diffusers and PEFT take alpha = r
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", rank))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _unmatched_error(keys: list[str], why: str) -> LoraError:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return LoraError(
        f"LoRA keys that match no layer of the Z-Image transformer ({len(keys)}; {why}), e.g. {shown}. "
        "Layouts read: diffusers/PEFT ('transformer.<module>.lora_A.weight' / 'lora_B.weight') and what diffusers' "
        "Z-Image converter turns into it (kohya 'lora_unet_*', 'diffusion_model.*', lora_down/lora_up with .alpha)")


def adapter_from_state_dict(name: str, state_dict: dict[str, torch.Tensor], metadata: dict | None,
                            transformer: nn.Module) -> Adapter:
    """Group `transformer.<module>.lora_A/B.weight` pairs into per-layer factors, checked against the model."""
    if any(".lokr_" in k for k in state_dict):
        raise LoraError("this is a LoKr adapter (Kronecker factors); only LoRA (lora_A/lora_B) can be merged here")
    if any("lora_magnitude_vector" in k for k in state_dict) or _peft_config(metadata).get("use_dora"):
        raise LoraError("this is a DoRA adapter (a magnitude vector per layer); only plain LoRA can be merged here")
    if not state_dict:
        raise LoraError("the LoRA holds no tensors")
    config = _peft_config(metadata)
    downs, ups, unmatched = {}, {}, []
    for key, tensor in state_dict.items():
        module = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if module is not None and module.endswith(DOWN):
            downs[module[: -len(DOWN)]] = tensor
        elif module is not None and module.endswith(UP):
            ups[module[: -len(UP)]] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        raise _unmatched_error(sorted(unmatched), "not 'transformer.<module>.lora_A.weight' / 'lora_B.weight' "
                               "after diffusers' conversion")
    lonely = sorted(set(downs) ^ set(ups))
    if lonely:
        raise LoraError(f"LoRA layers with only one of lora_A / lora_B: {lonely[:SHOWN_KEYS]}")
    modules = dict(transformer.named_modules())
    missing = sorted(PREFIX + m for m in downs if not isinstance(modules.get(m), (nn.Linear, Fp8Linear)))
    if missing:
        raise _unmatched_error(missing, "no linear layer of that name in this transformer")
    layers = {}
    for module, down in downs.items():
        up, layer = ups[module], modules[module]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or \
                (up.shape[0], down.shape[1]) != (layer.out_features, layer.in_features):
            raise LoraError(
                f"LoRA layer {module}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not fit the "
                f"layer's {layer.out_features} x {layer.in_features} weight (need [r, {layer.in_features}] and "
                f"[{layer.out_features}, r]): an adapter for another model?")
        # On the layer's device once: each merge then moves nothing but the base (FP8 layers).
        device = layer.weight_fp8.device if isinstance(layer, Fp8Linear) else layer.weight.device
        layers[module] = LoraLayer(down.to(device), up.to(device), _layer_scale(config, module, down.shape[0]))
    return Adapter(name, layers)
