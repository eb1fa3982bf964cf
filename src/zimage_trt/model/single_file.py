"""A single-file transformer checkpoint (one .safetensors, as ComfyUI users have it), through diffusers'
single-file machinery: its key converter (`convert_z_image_transformer_checkpoint_to_diffusers`: the
original repository's names, `model.diffusion_model.` prefixes, fused qkv) and
`ZImageTransformer2DModel.from_single_file`, with the architecture taken from a diffusers-format
folder's (or hub id's) `transformer/config.json`. Read with safetensors only; the keys are checked
against the model before anything is built, so a checkpoint of another model is named, not half-loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .weights import (
    PICKLE_SUFFIXES,
    WeightsError,
    _check_safetensors,
    _read_transformer_config,
    _resolve_root,
    _transformer_dir,
    weights_fingerprint,
)

DEFAULT_CONFIG = "Tongyi-MAI/Z-Image-Turbo"  # what diffusers' single-file loader picks for Z-Image
CONFIG_HUB_PATTERNS = ["model_index.json", "transformer/*.json"]


def read_single_file(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (CPU), refusing anything but a valid .safetensors file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"{file}: no such file; from_single_file takes one .safetensors transformer checkpoint")
    if file.suffix != ".safetensors":
        why = "a pickle checkpoint, never unpickled here (it can run arbitrary code)" if file.suffix in PICKLE_SUFFIXES \
            else f"not a .safetensors file ({file.suffix or 'no suffix'})"
        raise WeightsError(f"{file}: {why}; from_single_file reads .safetensors only. Convert it once in an "
                           "environment you trust (safetensors.torch.save_file(torch.load(...), 'model.safetensors')).")
    _check_safetensors(file)
    from safetensors.torch import load_file

    return load_file(os.fspath(file), device="cpu")


def load_single_file_transformer(path, config=None, torch_dtype: torch.dtype | None = None):
    """(ZImageTransformer2DModel on the CPU in eval mode, fingerprint of its weights as stored).

    `config`: a diffusers-format Z-Image folder (pipeline root or transformer/) or hub id whose
    transformer config describes the checkpoint (default: diffusers' choice, Tongyi-MAI/Z-Image-Turbo).
    The fingerprint is the one a folder holding the same tensors would have, so engines built from
    that folder are matched (and engines built from other weights refused).
    """
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_model import _should_convert_state_dict_to_diffusers
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    checkpoint = read_single_file(path)
    root = _resolve_root(config or DEFAULT_CONFIG, CONFIG_HUB_PATTERNS, None)
    folder = _transformer_dir(root)
    model_config = _read_transformer_config(folder)
    with torch.device("meta"):
        expected = ZImageTransformer2DModel.from_config(model_config).state_dict()
    # diffusers' own converter (it pops from what it is given: a shallow copy), for the names it will load.
    stored = convert_z_image_transformer_checkpoint_to_diffusers(dict(checkpoint)) \
        if _should_convert_state_dict_to_diffusers(expected, checkpoint) else checkpoint
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not a Z-Image transformer checkpoint for {folder / 'config.json'} (after diffusers' key "
            f"conversion: {len(missing)} tensors missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
            f"{unexpected[:3]})")
    fingerprint = weights_fingerprint(stored)
    subfolder = "transformer" if folder != root else None
    model = ZImageTransformer2DModel.from_single_file(checkpoint, config=os.fspath(root), subfolder=subfolder,
                                                      torch_dtype=torch_dtype, local_files_only=True)
    leftover = [n for n, t in model.state_dict().items() if t.is_meta]
    if leftover:
        raise WeightsError(f"{path}: tensors the checkpoint did not provide: {leftover[:3]}")
    # LoRA on FP8 re-reads 16-bit weights from the model's folder; this model has a file, not a folder.
    model.register_to_config(_name_or_path=os.fspath(Path(path).expanduser()))
    return model.eval(), fingerprint
