"""The control places a ControlNet-ready TensorRT engine is built for: the main layers after which a
ControlNet's hints join the stream (diffusers' `ZImageControlNetModel.config.control_layers_places`, the
keys of its `controlnet_block_samples`), in hint order.

    control_places_of([0, 2, 4])                      # given
    control_places_of("0,2,4")                        # as the CLI's --controlnet-places
    control_places_of(controlnet)                     # a loaded ZImageControlNetModel
    control_places_of("controlnet/")                  # a diffusers-format folder: its config.json
    control_places_of("union-2.1.safetensors")        # one file: diffusers' loader reads which ControlNet

A single file names no places: diffusers' single-file loader recognises the checkpoint by its keys
(Union v1 / 2.0 / 2.1) and takes that layout's published config (a hub id: online, or in the local hub
cache); `config=` names another folder or hub id. The file is read with safetensors only (its header,
and the one tensor diffusers looks at to tell 2.0 from 2.1), and the number of control layers it holds
must equal the number of places. Nothing is unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..model.weights import PICKLE_SUFFIXES, WeightsError, _check_safetensors

CONTROLNET_CLASS = "ZImageControlNetModel"
_CONTROL_LAYER_KEY = re.compile(r"^control_layers\.(\d+)\.")


def parse_places(text: str) -> tuple[int, ...]:
    """'0,2,4' -> (0, 2, 4); anything else is refused with what a list looks like."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"cannot read ControlNet places {text!r}: write main-layer indices separated by commas, "
                         "e.g. 0,2,4 (Union 2.x: 0,2,4,...,28)")
    return tuple(int(p) for p in parts)


def control_places_of(controlnet, config=None) -> tuple[int, ...]:
    """The control places of `controlnet` (module doc for what it may be); () for None."""
    if controlnet is None:
        return ()
    if isinstance(controlnet, str) and re.fullmatch(r"[\d,\s]+", controlnet) and not Path(controlnet).exists():
        return parse_places(controlnet)
    if isinstance(controlnet, (str, os.PathLike)):
        return _places_from_path(Path(controlnet).expanduser(), config)
    model_config = getattr(controlnet, "config", None)
    if model_config is not None:
        return _places_in_config(model_config, f"{type(controlnet).__name__}.config")
    if isinstance(controlnet, Sequence) and all(isinstance(p, int) and not isinstance(p, bool) for p in controlnet):
        return tuple(controlnet)
    raise TypeError(f"controlnet must be a ZImageControlNetModel, a diffusers-format folder, one .safetensors "
                    f"file or a list of main-layer indices, got {type(controlnet).__name__}")


def _places_in_config(config: Mapping, where: str) -> tuple[int, ...]:
    places = config.get("control_layers_places")
    if not isinstance(places, (list, tuple)) or not places or not all(isinstance(p, int) for p in places):
        raise ValueError(f"{where} has no control_layers_places list (got {places!r}): is it a {CONTROLNET_CLASS}?")
    return tuple(places)


def _read_config(source) -> tuple[dict, str]:
    """(config, where) of a diffusers-format folder (its config.json or controlnet/config.json) or hub id,
    through diffusers' own config loader."""
    from diffusers import ZImageControlNetModel

    folder = Path(source).expanduser()
    if folder.is_dir():
        folder = folder if (folder / "config.json").is_file() else folder / "controlnet"
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{source}: no config.json (nor controlnet/config.json): not a diffusers-format "
                               f"{CONTROLNET_CLASS} folder")
        source = folder
    raw = ZImageControlNetModel.load_config(os.fspath(source))
    where = str(folder / "config.json") if folder.is_dir() else str(source)
    if raw.get("_class_name", CONTROLNET_CLASS) != CONTROLNET_CLASS:
        raise WeightsError(f"{where} describes a {raw['_class_name']}, not a {CONTROLNET_CLASS}")
    return raw, where


def _places_from_path(path: Path, config) -> tuple[int, ...]:
    if path.is_dir():
        return _places_in_config(*_read_config(path))
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or folder (a {CONTROLNET_CLASS} folder or one .safetensors file)")
    if path.suffix != ".safetensors":
        why = "a pickle checkpoint, never unpickled here (it can run arbitrary code)" if path.suffix in PICKLE_SUFFIXES \
            else f"not a .safetensors file ({path.suffix or 'no suffix'})"
        raise WeightsError(f"{path}: {why}; give a .safetensors ControlNet, its diffusers folder, or the places")
    return _places_of_single_file(path, config)


class _LazyCheckpoint(Mapping):
    """A safetensors file as the mapping diffusers' model-type inference reads: keys from the header, a
    tensor only when asked for."""

    def __init__(self, handle):
        self._handle, self._keys = handle, list(handle.keys())

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key):
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _places_of_single_file(path: Path, config) -> tuple[int, ...]:
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, infer_diffusers_model_type
    from safetensors import safe_open

    _check_safetensors(path)
    with safe_open(os.fspath(path), framework="pt") as handle:
        checkpoint = _LazyCheckpoint(handle)
        model_type = infer_diffusers_model_type(checkpoint)
        if not model_type.startswith("z-image-turbo-controlnet"):
            raise WeightsError(f"{path}: not a Z-Image ControlNet checkpoint (diffusers' loader reads it as "
                               f"{model_type!r})")
        source = config or fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        layers = {int(m.group(1)) for k in checkpoint if (m := _CONTROL_LAYER_KEY.match(k))}
    try:
        raw, where = _read_config(source)
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: diffusers reads it as {model_type!r}, whose config is {source!r}, which cannot be read here "
            f"({exc}); pass the places (--controlnet-places 0,2,...), a diffusers-format folder, or config=") from exc
    places = _places_in_config(raw, f"{where} (the config of {path.name})")
    if len(layers) != len(places):
        raise WeightsError(f"{path} holds {len(layers)} control layers but {where} lists {len(places)} places "
                           f"{list(places)}: that config does not describe this checkpoint")
    return places
