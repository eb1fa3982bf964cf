"""Weights in, never unpickled.

Z-Image-Turbo weights come from one of three places:

* an in-memory ``ZImageTransformer2DModel`` (returned cast/moved),
* a local diffusers-format folder: the pipeline root (with ``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or the ``transformer/`` folder
  itself, with single or sharded ``diffusion_pytorch_model*.safetensors``,
* a hub id ``org/name``, fetched with ``huggingface_hub.snapshot_download`` restricted
  to ``*.safetensors`` / ``*.json`` (and tokenizer text files), so pickles are never
  even downloaded.

Only safetensors are read. A folder holding only ``.bin``/``.pt`` checkpoints is
refused with :class:`WeightsError`: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

TRANSFORMER_CLASS = "ZImageTransformer2DModel"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")

# What snapshot_download may fetch: configs, safetensors and tokenizer text files only.
TRANSFORMER_HUB_PATTERNS = ["model_index.json", "transformer/*.json", "transformer/*.safetensors"]
PARTS_HUB_PATTERNS = [
    "model_index.json",
    "vae/*.json",
    "vae/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "tokenizer/*.json",
    "tokenizer/*.txt",
    "tokenizer/*.jinja",
    "scheduler/*.json",
]

# weights_fingerprint sampling: evenly spaced elements plus both ends of each tensor.
FINGERPRINT_SAMPLES = 4096
FINGERPRINT_EDGE = 64
_FINGERPRINT_TAG = b"zimage_trt.weights_fingerprint.v1\0"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_CONVERT_HINT = (
    "Convert it once, in an environment you trust, e.g.\n"
    "  python -c \"from diffusers import {cls} as M; "
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors', safe_serialization=True)\"\n"
    "and point zimage_trt at the converted folder."
)


class WeightsError(ValueError):
    """Weights could not be found, are not safetensors, or do not match the expected model."""


# --------------------------------------------------------------------------- sources


def is_hub_id(text: str) -> bool:
    """`text` names a Hugging Face hub repo ('org/name'), not a relative path ('./x', '../x/y')."""
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith(".")


def _download(repo_id: str, allow_patterns: list[str], revision: str | None) -> Path:
    """Fetch only the allowed files of a hub repo (used at user sites, never in tests)."""
    import huggingface_hub  # looked up at call time so tests can monkeypatch it

    try:
        local = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except Exception as e:  # network, auth, offline mode, unknown repo...
        raise WeightsError(
            f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face hub failed: {e}"
        ) from e
    return Path(local)


def _resolve_root(source: str | os.PathLike, allow_patterns: list[str], revision: str | None) -> Path:
    """A local folder for ``source``: the path itself if it exists, else a hub download."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path}: is a file; expected a diffusers-format Z-Image folder")
        return path
    text = os.fspath(source)
    if is_hub_id(text):
        return _download(text, allow_patterns, revision)
    raise WeightsError(
        f"{path}: folder not found; expected a diffusers-format Z-Image pipeline folder "
        f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), "
        f"a transformer/ folder (config.json + diffusion_pytorch_model*.safetensors) or a hub id 'org/name'"
    )


def _refuse_pickles(folder: Path, cls: str) -> None:
    """Raise if ``folder`` has pickle checkpoints but no safetensors; else say what is missing."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles)}) and no *.safetensors. "
            f"zimage_trt never unpickles weights (loading a pickle can run arbitrary code). "
            + _CONVERT_HINT.format(cls=cls, src=folder)
        )


def _check_safetensors(file: Path) -> None:
    """Cheap integrity check: parses the header and checks the file covers all tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(file), framework="pt"):
            pass
    except Exception as e:
        raise WeightsError(f"{file}: not a valid safetensors file (corrupt or truncated?): {e}") from e


def _transformer_dir(root: Path) -> Path:
    """The folder holding the transformer's config.json and weights."""
    sub = root / "transformer"
    return sub if sub.is_dir() else root


def _read_transformer_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(
            f"{config_file}: config.json missing; expected a Z-Image pipeline folder with transformer/ "
            f"or a transformer folder with config.json and diffusion_pytorch_model*.safetensors"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_file}: cannot read config.json: {e}") from e
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != TRANSFORMER_CLASS:
        raise WeightsError(
            f"{config_file}: _class_name is {found!r}, not {TRANSFORMER_CLASS!r}; this is not a Z-Image transformer"
        )
    return config


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, validated: every file exists and parses.

    Sharded checkpoints are read through their index json; otherwise the single
    ``diffusion_pytorch_model.safetensors`` is used.
    """
    from safetensors import safe_open

    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = {name: folder / shard for name, shard in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index_file}: unreadable shard index (need a 'weight_map'): {e}") from e
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise WeightsError(f"{shard}: shard named in {index_file.name} is missing")
            _check_safetensors(shard)
        # The index must not promise tensors its shard lacks.
        by_shard: dict[Path, list[str]] = {}
        for name, shard in files.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            with safe_open(os.fspath(shard), framework="pt") as f:
                missing = sorted(set(names) - set(f.keys()))
            if missing:
                raise WeightsError(f"{shard}: lacks tensors the index assigns to it, e.g. {missing[:3]}")
        return files

    single = folder / SINGLE_FILE
    if single.is_file():
        _check_safetensors(single)
        with safe_open(os.fspath(single), framework="pt") as f:
            return {name: single for name in f.keys()}

    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:  # e.g. a variant such as diffusion_pytorch_model.fp16.safetensors
        raise WeightsError(
            f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found; other safetensors present: {', '.join(others)}"
        )
    _refuse_pickles(folder, TRANSFORMER_CLASS)
    raise WeightsError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _iter_folder_tensors(files: Mapping[str, Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in sorted name order, one tensor in memory at a time."""
    from safetensors import safe_open

    handles = {}
    try:
        for name in sorted(files):
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(os.fspath(file), framework="pt", device=device)
            try:
                tensor = handles[file].get_tensor(name)
            except Exception as e:
                raise WeightsError(f"{file}: cannot read tensor {name!r}: {e}") from e
            yield name, tensor
    finally:
        handles.clear()


# --------------------------------------------------------------------------- transformer


def load_transformer(
    source,
    torch_dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    *,
    revision: str | None = None,
):
    """Load a ``ZImageTransformer2DModel`` from a model, a local folder or a hub id.

    ``source``: an in-memory ``ZImageTransformer2DModel`` (cast/moved and returned, not
    copied); a pipeline root folder with ``transformer/``, or the ``transformer/``
    folder itself (config.json + single or sharded safetensors); or a hub id
    ``org/name`` (downloads only json + safetensors). ``torch_dtype=None`` keeps the
    checkpoint's stored dtypes. The model is built on the meta device and the
    safetensors tensors are assigned into it, so no random init is run and memory
    peaks at one copy of the weights. Returned in eval mode.
    """
    from diffusers import ZImageTransformer2DModel

    if isinstance(source, nn.Module):
        if not isinstance(source, ZImageTransformer2DModel):
            raise WeightsError(f"expected a {TRANSFORMER_CLASS}, got {type(source).__name__}")
        return source.to(device=device, dtype=torch_dtype) if torch_dtype else source.to(device)

    folder = _transformer_dir(_resolve_root(source, TRANSFORMER_HUB_PATTERNS, revision))
    config = _read_transformer_config(folder)
    files = _weight_map(folder)

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{folder}: weights do not match config.json: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )

    state_dict = {}
    load_device = str(torch.device(device))
    for name, tensor in _iter_folder_tensors(files, device=load_device):
        if tuple(tensor.shape) != expected[name]:
            raise WeightsError(
                f"{files[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {expected[name]}"
            )
        if torch_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(torch_dtype)
        state_dict[name] = tensor
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.register_to_config(_name_or_path=os.fspath(folder))  # as diffusers' from_pretrained records it

    # Anything still on meta (a buffer no checkpoint holds) would fail at run time.
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise WeightsError(f"{folder}: tensors not provided by the checkpoint: {leftover[:3]}")
    return model.eval()


def read_transformer_tensors(source, names: Iterable[str], torch_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Some of a transformer folder's tensors by diffusers name, on the CPU, cast as `load_transformer`
    casts them (e.g. the 16-bit weights behind FP8 layers, which the GPU no longer holds)."""
    folder = _transformer_dir(_resolve_root(source, TRANSFORMER_HUB_PATTERNS, None))
    files = _weight_map(folder)
    wanted = sorted(set(names))
    absent = [n for n in wanted if n not in files]
    if absent:
        raise WeightsError(f"{folder}: has no tensors {absent[:3]} ({len(absent)} missing)")
    out = {}
    for name, tensor in _iter_folder_tensors({n: files[n] for n in wanted}):
        out[name] = tensor.to(torch_dtype) if torch_dtype is not None and tensor.is_floating_point() else tensor
    return out


# --------------------------------------------------------------------------- other parts


def load_vae(root: Path, torch_dtype: torch.dtype = torch.float32):
    """The pipeline folder's `vae/` (safetensors only), on the CPU in eval mode."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=True).eval()


def load_pipeline_parts(
    source,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    revision: str | None = None,
) -> dict:
    """Load vae, text_encoder, tokenizer and scheduler from a diffusers-format pipeline.

    ``source`` is a local pipeline root folder or a hub id (downloads only configs,
    safetensors and tokenizer text files). Returns a dict with keys ``vae``
    (``AutoencoderKL``), ``text_encoder`` (transformers ``AutoModel``, a ``Qwen3Model``
    for Z-Image), ``tokenizer`` (``AutoTokenizer``) and ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``). Models are in eval mode on ``device``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoModel, AutoTokenizer

    root = _resolve_root(source, PARTS_HUB_PATTERNS, revision)
    absent = [part for part in PIPELINE_PARTS if not (root / part).is_dir()]
    if absent:
        raise WeightsError(
            f"{root}: missing pipeline subfolder(s) {', '.join(p + '/' for p in absent)}; expected a "
            f"diffusers-format Z-Image pipeline folder with {', '.join(p + '/' for p in PIPELINE_PARTS)}"
        )
    for part, cls in (("vae", "AutoencoderKL"), ("text_encoder", "Qwen3Model")):
        folder = root / part
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{folder / 'config.json'}: config.json missing for the {part}")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            _refuse_pickles(folder, cls)
            raise WeightsError(f"{folder}: no *.safetensors weights found for the {part}")
        # Name a missing shard ourselves; the libraries' messages vary by version.
        for index_file in folder.glob("*.safetensors.index.json"):
            try:
                shards = set(json.loads(index_file.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise WeightsError(f"{index_file}: unreadable shard index (need a 'weight_map'): {e}") from e
            for shard in sorted(shards):
                if not (folder / shard).is_file():
                    raise WeightsError(f"{folder / shard}: shard named in {index_file.name} is missing")
        for file in weights:
            _check_safetensors(file)

    def load(part: str, fn):
        try:
            return fn()
        except WeightsError:
            raise
        except Exception as e:  # surface which part failed, keep the library's reason
            raise WeightsError(f"{root / part}: failed to load the {part}: {e}") from e

    vae = load("vae", lambda: load_vae(root, torch_dtype))
    text_encoder = load(
        "text_encoder",
        lambda: AutoModel.from_pretrained(root / "text_encoder", dtype=torch_dtype, use_safetensors=True),
    )
    tokenizer = load("tokenizer", lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
    scheduler = load(
        "scheduler", lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    )
    return {
        "vae": vae.to(device).eval(),
        "text_encoder": text_encoder.to(device).eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


# --------------------------------------------------------------------------- fingerprint


def _sample_indices(numel: int) -> torch.Tensor | None:
    """Flat indices hashed for a tensor of ``numel`` elements; None means all of them.

    Integer arithmetic only, so the same indices come out on every device.
    """
    if numel <= FINGERPRINT_SAMPLES + 2 * FINGERPRINT_EDGE:
        return None
    spread = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * (numel - 1) // (FINGERPRINT_SAMPLES - 1)
    head = torch.arange(FINGERPRINT_EDGE, dtype=torch.int64)
    tail = torch.arange(numel - FINGERPRINT_EDGE, numel, dtype=torch.int64)
    return torch.cat([head, spread, tail])


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]], full: bool) -> str:
    h = hashlib.sha256(_FINGERPRINT_TAG)
    for name, tensor in items:
        if tensor.is_meta:
            raise WeightsError(f"cannot fingerprint {name!r}: it is on the meta device (weights not loaded)")
        flat = tensor.detach().reshape(-1)
        idx = None if full else _sample_indices(flat.numel())
        sample = flat if idx is None else flat[idx.to(flat.device)]
        # Raw bytes of the stored dtype (works for bf16/fp8, which numpy lacks).
        data = sample.contiguous().view(torch.uint8).cpu().numpy().tobytes()
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{len(data)}\0".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(data)
    return h.hexdigest()


def weights_fingerprint(model_or_folder, *, full: bool = False, revision: str | None = None) -> str:
    """sha256 hex digest identifying a set of weights, cheap even for a 12 GB model.

    Accepts an ``nn.Module`` (its ``state_dict()``: parameters and persistent buffers),
    a ``{name: tensor}`` mapping, or a transformer source as for :func:`load_transformer`
    (pipeline root, ``transformer/`` folder or hub id; tensors are streamed from the
    safetensors one at a time in their stored dtype, without building a model).

    What is hashed, per tensor in sorted name order: its name, dtype, shape, and the
    raw bytes of a sample of its elements (flattened in row-major order):

    * tensors of at most 4224 elements: every element;
    * larger tensors: the first 64 and last 64 elements plus 4096 evenly spaced ones
      (flat indices ``i * (numel - 1) // 4095`` for ``i`` in ``0..4095``).

    So a change of any name, dtype or shape, of any element of a small tensor, or of a
    sampled element of a large one changes the digest; an edit confined to unsampled
    elements of a large tensor does not (pass ``full=True`` to hash every byte).
    The dtype is part of the digest: the same weights cast to another dtype give
    another fingerprint. Equal stored weights give equal digests whether they come from
    a folder, a sharded folder or an in-memory model, on any device.
    """
    if isinstance(model_or_folder, nn.Module):
        state = model_or_folder.state_dict()
        return _hash_tensors(((k, state[k]) for k in sorted(state)), full)
    if isinstance(model_or_folder, Mapping):
        return _hash_tensors(((k, model_or_folder[k]) for k in sorted(model_or_folder)), full)

    folder = _transformer_dir(_resolve_root(model_or_folder, TRANSFORMER_HUB_PATTERNS, revision))
    _read_transformer_config(folder)
    return _hash_tensors(_iter_folder_tensors(_weight_map(folder)), full)


def config_fingerprint(model) -> str:
    """sha256 of a model's architecture config (diffusers' private `_...` keys, such as the folder it was
    loaded from, left out), so an engine can tell it was built for another architecture."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
