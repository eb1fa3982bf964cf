"""The JSON record written beside every engine, and its validation.

Engines and manifests are files a user may have downloaded, so a manifest is checked field by field
before anything it names is read: known keys and types only, file names that cannot leave the engine
folder, and a sha256 for every file it names, checked before the file is loaded.

Format 2 stores each shape's `width` and `height` as numbers, so no reader has to know which way round a
size string goes. Format 1 stored a "HEIGHTxWIDTH" string (sizes are now written WIDTHxHEIGHT everywhere
else): a format-1 manifest whose shapes are all square reads the same either way and is taken; one with
a non-square shape is refused with the size to rebuild, rather than read as a guess.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_write_text, sha256_file
from ..model.precision import PRECISIONS
from ..model.shapes import Resolution, check_caption_capacity
from . import contract

# 2: each shape's width and height by name (format 1 wrote "HEIGHTxWIDTH" strings: see _check_height_first),
# and the ControlNet-ready TensorRT variant's controlnet_places, controlnet_hint_shapes. A format-1 manifest
# has neither ControlNet field, so it describes a plain engine.
FORMAT_VERSION = 2
HEIGHT_FIRST_FORMAT = 1  # shapes as {"resolution": "HEIGHTxWIDTH", ...}
MANIFEST_SUFFIX = ".manifest.json"
BACKENDS = ("tensorrt", "tensorrt-rtx", "torch-compiled")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest is malformed, names a file outside its folder, or does not match its files."""


@dataclass
class EngineShape:
    resolution: str  # Resolution.key, "WIDTHxHEIGHT" (stored as numbers: see to_json)
    batch: int
    caption_capacity: int

    def __post_init__(self):
        self.resolution = Resolution.parse(self.resolution).key

    @property
    def size(self) -> Resolution:
        return Resolution.parse(self.resolution)

    def to_dict(self) -> dict:
        size = self.size
        return {"width": size.width, "height": size.height, "batch": self.batch,
                "caption_capacity": self.caption_capacity}

    @classmethod
    def from_dict(cls, raw: dict) -> "EngineShape":
        return cls(Resolution(raw["height"], raw["width"]).key, raw["batch"], raw["caption_capacity"])


@dataclass
class FileRecord:
    name: str
    sha256: str
    bytes: int


@dataclass
class Manifest:
    name: str  # engine name: the manifest file is NAME.manifest.json
    component: str  # "denoiser" or "vae_decoder"
    backend: str
    backend_version: str
    precision: str
    shapes: list[EngineShape]
    files: list[FileRecord]
    compute_capabilities: list[str]
    torch_version: str
    model: dict  # class, config sha256, weights fingerprint
    fp16_downscale_log2: dict = field(default_factory=dict)
    # torch-compiled engines: the attention kernel the build compiled for (model/attention.py), whether
    # the fused Triton kernels were on, and for FP8 the blocks kept bf16 by the quality policy with the
    # sensitivity that chose them (compiler/fp8_policy.py). The runtime applies the same.
    attention_backend: str = "sdpa"
    fused_kernels: bool = False
    fp8_keep: list = field(default_factory=list)
    fp8_sensitivity: dict = field(default_factory=dict)
    onnx_sha256: str | None = None
    build_seconds: float = 0.0
    # TensorRT engines built with refittable=True: {engine weight name: [[diffusers names], "" | "T"]}, the
    # transformer weights each engine weight holds (transposed where "T"), found by value at build time.
    refittable: bool = False
    refit_weights: dict = field(default_factory=dict)
    # A ControlNet-ready TensorRT engine (`build_engines(..., controlnet=...)`): the main layers whose
    # output each hint is added to, in hint order, and the `controlnet_hints` shape [P, B, S, D] of each
    # entry of `shapes`, in that order. Both empty: a plain engine (every torch-compiled engine is one: it
    # takes hints at run time).
    controlnet_places: list = field(default_factory=list)
    controlnet_hint_shapes: list = field(default_factory=list)
    created: str = ""
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        raw = asdict(self)
        raw["shapes"] = [shape.to_dict() for shape in self.shapes]
        return json.dumps(raw, indent=2, sort_keys=True)

    def write(self, folder: str | Path) -> Path:
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        validate(json.loads(self.to_json()))
        path = Path(folder) / f"{self.name}{MANIFEST_SUFFIX}"
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not a readable JSON manifest ({exc})") from exc
        try:
            validate(raw)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        raw = dict(raw)
        if raw.get("format_version", FORMAT_VERSION) == HEIGHT_FIRST_FORMAT:  # all square: see validate
            raw["shapes"] = [{"width": Resolution.parse(s["resolution"]).width,
                              "height": Resolution.parse(s["resolution"]).height, "batch": s["batch"],
                              "caption_capacity": s["caption_capacity"]} for s in raw["shapes"]]
            raw["format_version"] = FORMAT_VERSION
        raw["shapes"] = [EngineShape.from_dict(s) for s in raw["shapes"]]
        raw["files"] = [FileRecord(**f) for f in raw["files"]]
        return cls(**raw)

    # -- checks --------------------------------------------------------------------------------
    def file_path(self, folder: str | Path, record: FileRecord) -> Path:
        return Path(folder) / record.name

    def verify_files(self, folder: str | Path) -> None:
        """Every named file exists with the recorded size and sha256; the error says how to fix it."""
        for record in self.files:
            path = self.file_path(folder, record)
            rebuild = f"rebuild it with `zimage-trt build` (or delete {self.name}{MANIFEST_SUFFIX})"
            if not path.is_file():
                raise ManifestError(f"engine file {path} named by manifest {self.name} is missing; {rebuild}")
            size = path.stat().st_size
            if size != record.bytes:
                raise ManifestError(
                    f"engine file {path} is {size} bytes but its manifest says {record.bytes}: truncated or "
                    f"replaced; {rebuild}"
                )
            if sha256_file(path) != record.sha256:
                raise ManifestError(f"engine file {path} does not match its manifest's sha256: corrupt or swapped; {rebuild}")


def validate(raw) -> None:
    """Schema check of a parsed manifest; raises ManifestError naming the first bad field."""
    if not isinstance(raw, dict):
        raise ManifestError("manifest must be a JSON object")
    required = {
        "name": str, "component": str, "backend": str, "backend_version": str, "precision": str,
        "shapes": list, "files": list, "compute_capabilities": list, "torch_version": str, "model": dict,
    }
    optional = {
        "fp16_downscale_log2": dict, "onnx_sha256": (str, type(None)), "build_seconds": (int, float),
        "created": str, "format_version": int, "refittable": bool, "refit_weights": dict,
        "attention_backend": str, "fused_kernels": bool,
        "fp8_keep": list, "fp8_sensitivity": dict, "controlnet_places": list, "controlnet_hint_shapes": list,
    }
    unknown = sorted(set(raw) - set(required) - set(optional))
    if unknown:
        raise ManifestError(f"unknown manifest keys {unknown}")
    for key, kind in {**required, **optional}.items():
        if key in required and key not in raw:
            raise ManifestError(f"manifest lacks {key!r}")
        if key in raw and not isinstance(raw[key], kind):
            raise ManifestError(f"manifest field {key!r} has the wrong type {type(raw[key]).__name__}")
    version = raw.get("format_version", FORMAT_VERSION)
    readable = [HEIGHT_FIRST_FORMAT, FORMAT_VERSION]
    if version not in readable:
        raise ManifestError(f"manifest format {version} is not one this version reads {readable}; rebuild the engine")
    if version == HEIGHT_FIRST_FORMAT and (raw.get("controlnet_places") or raw.get("controlnet_hint_shapes")):
        raise ManifestError("a format-1 manifest has no ControlNet fields; rebuild the engine")
    if not _SAFE_NAME.match(raw["name"]):
        raise ManifestError(f"engine name {raw['name']!r} is not a plain file name")
    if raw["component"] not in ("denoiser", "vae_decoder"):
        raise ManifestError(f"component {raw['component']!r} is not 'denoiser' or 'vae_decoder'")
    if raw["backend"] not in BACKENDS:
        raise ManifestError(f"backend {raw['backend']!r} is not one of {BACKENDS}")
    if raw["precision"] not in PRECISIONS:
        raise ManifestError(f"precision {raw['precision']!r} is not one of {PRECISIONS}")
    if not raw["files"]:
        raise ManifestError("manifest names no files")
    for record in raw["files"]:
        if not isinstance(record, dict) or set(record) != {"name", "sha256", "bytes"}:
            raise ManifestError(f"file record {record!r} must have exactly name, sha256, bytes")
        # Names are bare file names: no folders, no '..', nothing absolute, so nothing outside engine_dir.
        if not isinstance(record["name"], str) or not _SAFE_NAME.match(record["name"]):
            raise ManifestError(f"file name {record['name']!r} is not a plain file name inside the engine folder")
        if not isinstance(record["sha256"], str) or not _HEX64.match(record["sha256"]):
            raise ManifestError(f"file {record['name']!r} has no valid sha256")
        if not isinstance(record["bytes"], int) or record["bytes"] < 0:
            raise ManifestError(f"file {record['name']!r} has an invalid size")
    shape_keys = ("resolution",) if version == HEIGHT_FIRST_FORMAT else ("width", "height")
    shape_keys += ("batch", "caption_capacity")
    for shape in raw["shapes"]:
        if not isinstance(shape, dict) or set(shape) != set(shape_keys):
            raise ManifestError(f"shape {shape!r} must have exactly {', '.join(shape_keys)}")
        try:
            if version == HEIGHT_FIRST_FORMAT:
                _check_height_first(shape["resolution"])
            else:
                Resolution(shape["height"], shape["width"])
            check_caption_capacity(shape["caption_capacity"])
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"shape {shape!r}: {exc}") from None
        if not isinstance(shape["batch"], int) or not 1 <= shape["batch"] <= 64:
            raise ManifestError(f"shape {shape!r}: batch must be an int in 1..64")
    _validate_controlnet(raw)
    for cc in raw["compute_capabilities"]:
        if not isinstance(cc, str) or not re.fullmatch(r"\d{1,2}\.\d", cc):
            raise ManifestError(f"compute capability {cc!r} is not like '9.0'")
    for engine_name, entry in raw.get("refit_weights", {}).items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and entry[0]
                and all(isinstance(n, str) for n in entry[0]) and entry[1] in ("", "T")):
            raise ManifestError(f"refit_weights[{engine_name!r}] must be [[transformer weight names], '' or 'T']")
    for block, pair in raw.get("fp16_downscale_log2", {}).items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(k, int) and 0 <= k <= 30 for k in pair)):
            raise ManifestError(f"fp16_downscale_log2[{block!r}] must be two ints in 0..30")


def _check_height_first(text) -> None:
    """A format-1 shape string ("HEIGHTxWIDTH"): square reads the same in either convention; anything else
    is refused, naming the size in today's WIDTHxHEIGHT, so the engine is rebuilt instead of misread."""
    if not isinstance(text, str):
        raise TypeError(f"resolution must be a string, got {type(text).__name__}")
    read = Resolution.parse(text)  # (as WIDTHxHEIGHT: only its sides matter below)
    if read.height != read.width:
        height, width = read.width, read.height  # format 1 wrote the height first
        raise ValueError(
            f"this engine was built before sizes were written WIDTHxHEIGHT (manifest format "
            f"{HEIGHT_FIRST_FORMAT}), and its non-square shape {text!r} meant {height} tall and {width} wide; "
            f"rebuild it with `zimage-trt build --resolution {width}x{height} ...` (format {FORMAT_VERSION} "
            f"stores width and height by name)")


def _validate_controlnet(raw: dict) -> None:
    """Places: distinct layer indices; one hint shape per engine shape, the contract's for that shape."""
    places, hint_shapes = raw.get("controlnet_places", []), raw.get("controlnet_hint_shapes", [])
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in places) or len(set(places)) != len(places):
        raise ManifestError(f"controlnet_places {places!r} must be distinct main-layer indices (ints >= 0)")
    if not places:
        if hint_shapes:
            raise ManifestError("controlnet_hint_shapes given for an engine with no controlnet_places")
        return
    if raw["backend"] == "torch-compiled":
        raise ManifestError("a torch-compiled engine takes ControlNet hints at run time: it records no controlnet_places")
    if len(hint_shapes) != len(raw["shapes"]):
        raise ManifestError(f"controlnet_hint_shapes has {len(hint_shapes)} entries for {len(raw['shapes'])} shapes")
    dim = hint_shapes[0][-1] if isinstance(hint_shapes[0], list) and hint_shapes[0] else None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ManifestError(f"controlnet_hint_shapes {hint_shapes[0]!r} must be [places, batch, joint tokens, dim]")
    for shape, hint in zip(raw["shapes"], hint_shapes):
        want = list(contract.hint_shape(len(places), shape["batch"], Resolution(shape["height"], shape["width"]).latent_hw,
                                        shape["caption_capacity"], dim))
        if hint != want:
            raise ManifestError(f"controlnet_hint_shapes entry {hint!r} for shape {shape!r} is not [places, batch, "
                                f"joint tokens, dim] = {want}")


def find_manifests(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob(f"*{MANIFEST_SUFFIX}")) if folder.is_dir() else []


def record_file(path: str | Path) -> FileRecord:
    path = Path(path)
    return FileRecord(name=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)
