"""Engine selection: read the manifests in `engine_dir`, pick the one that fits this GPU, precision,
model and shape, verify its files, and open it. What was built and what this machine needs are named
in every refusal; `allow_fallback=True` runs eager torch with a warning instead."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import attention
from ..model.denoiser import StaticZImageDenoiser
from ..model.precision import precision_of
from ..model.weights import config_fingerprint
from . import kept_artifacts, torch_compiled
from .base import DenoiserEngine, TorchDenoiserEngine
from .manifest import Manifest, ManifestError, find_manifests
from .tensorrt.denoiser import BUILD_OPTION, TensorRTDenoiserEngine
from .tensorrt.library import available_flavors, flavor_versions


log = logging.getLogger("zimage_trt")


class EngineNotFound(RuntimeError):
    """No usable engine for this request; the message lists what was built and what is needed."""


@dataclass
class Need:
    resolution: str
    batch: int
    precision: str
    compute_capability: str | None
    weights_fingerprint: str | None
    config_sha256: str | None = None
    # A ControlNet's places (main layers, in hint order) when the engine must take its hints; None: text-to-image.
    controlnet_places: tuple[int, ...] | None = None


def current_compute_capability(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def reasons_unfit(manifest: Manifest, need: Need, runnable_backends: set[str],
                  backend_versions: dict[str, str] | None = None) -> list[str]:
    """Why `manifest` cannot serve `need` here ([] when it can). `backend_versions` ({flavour: installed
    version}) makes a TensorRT library other than the one that built the engine a reason: TensorRT plans
    deserialise only in the version that wrote them, and a refusal here lets `allow_fallback` work."""
    reasons = []
    if manifest.component != "denoiser":
        reasons.append("not a denoiser")
    if manifest.backend not in runnable_backends:
        reasons.append(f"backend {manifest.backend} cannot run here (runnable: {sorted(runnable_backends) or 'none'})")
    if manifest.precision != need.precision:
        reasons.append(f"precision {manifest.precision}, need {need.precision}")
    built_for = manifest.compute_capabilities  # GPU compute capabilities; [] = built on a CPU
    fits = need.compute_capability in built_for if need.compute_capability else not built_for
    if not fits:
        reasons.append(f"built for {', '.join(built_for) or 'CPU'}, this machine is {need.compute_capability or 'CPU'}")
    installed = (backend_versions or {}).get(manifest.backend)
    if manifest.backend != "torch-compiled" and installed is not None and installed != manifest.backend_version:
        reasons.append(f"built with {manifest.backend} {manifest.backend_version}, this machine has "
                       f"{manifest.backend} {installed} (a TensorRT engine loads only in the version that built it)")
    if manifest.backend == "torch-compiled" and manifest.torch_version != torch.__version__:
        reasons.append(f"built with torch {manifest.torch_version}, this is torch {torch.__version__}")
    if need.config_sha256 and manifest.model.get("config_sha256") not in (None, need.config_sha256):
        reasons.append("built for another model architecture (transformer config differs)")
    if need.weights_fingerprint and manifest.model.get("weights_fingerprint") not in (None, need.weights_fingerprint):
        reasons.append("built from other weights (weights fingerprint differs)")
    # A compiled torch engine serves any batch up to the one it was built for; TensorRT profiles are exact.
    flexible = manifest.backend == "torch-compiled"
    if not any(s.resolution == need.resolution and (s.batch >= need.batch if flexible else s.batch == need.batch)
               for s in manifest.shapes):
        built = ", ".join(f"{s.resolution} batch {s.batch}" for s in manifest.shapes)
        reasons.append(f"no shape {need.resolution} batch {need.batch} (built: {built})")
    # TensorRT takes hints only in its ControlNet-ready variant, for the places it was built for; the eager and
    # torch-compiled engines take any ControlNet's at run time (and a ControlNet-ready engine serves text-to-image).
    built_places = tuple(manifest.controlnet_places)
    if need.controlnet_places and manifest.backend != "torch-compiled" and built_places != tuple(need.controlnet_places):
        wanted = list(need.controlnet_places)
        reasons.append(f"ControlNet-ready for places {list(built_places)}, need {wanted}" if built_places else
                       f"a plain engine, which takes no ControlNet hints (need places {wanted}: {BUILD_OPTION})")
    return reasons


def runnable_backends(device: torch.device) -> set[str]:
    runnable = {"torch-compiled"}  # on CPU too: CPU builds exist for tests and CI
    if device.type == "cuda":
        for flavor, (ok, _why) in available_flavors().items():
            if ok:
                runnable.add(flavor)
    return runnable


def open_denoiser(transformer, engine_dir, device, dtype: torch.dtype, resolution: str, batch: int,
                  *, precision: str | None = None, weights_fingerprint: str | None = None,
                  allow_fallback: bool = False, downscale_log2=None, cache: dict | None = None,
                  attention_backend: str | None = None, controlnet_places=None) -> DenoiserEngine:
    """The engine to run `transformer` at `resolution` x `batch` on `device`.

    With no engine_dir the eager static denoiser is the engine (CPU tests, the demo). `cache` (a dict the
    caller keeps) maps engine files already opened to their engines, so an engine holding several
    resolutions is loaded once: its weights are on the GPU once.

    controlnet_places (a ControlNet's `control_layers_places`, in hint order): the engine must take that
    ControlNet's hints (`run(..., controlnet_hints=...)`): a TensorRT engine only in its ControlNet-ready
    variant built for exactly these places; an eager or torch-compiled engine has its denoiser's places set.
    None: text-to-image, which prefers a plain TensorRT engine to a ControlNet-ready one.
    """
    device = torch.device(device)
    precision = precision or precision_of(dtype)
    places = None if controlnet_places is None else tuple(int(p) for p in controlnet_places)
    if engine_dir is None:
        return _with_places(TorchDenoiserEngine(_static(transformer, downscale_log2, precision)), places)
    build = f"zimage-trt build --model MODEL --resolution {resolution} --precision {precision} --engine-dir {engine_dir}" + (
        f" --controlnet-places {','.join(map(str, places))}" if places else "")
    if not Path(engine_dir).is_dir():
        return _no_engine(
            f"engine_dir {str(engine_dir)!r} does not exist or is not a folder; build engines into it with: {build}",
            allow_fallback, transformer, downscale_log2, precision, places)
    need = Need(resolution, batch, precision, current_compute_capability(device), weights_fingerprint,
                config_fingerprint(transformer), places)
    runnable = runnable_backends(device)
    versions = flavor_versions() if runnable - {"torch-compiled"} else {}
    report = []
    candidates = []
    for path in find_manifests(engine_dir):
        try:
            manifest = Manifest.read(path)
        except ManifestError as exc:
            report.append(f"  {path.name}: unreadable ({exc})")
            continue
        reasons = reasons_unfit(manifest, need, runnable, versions)
        if reasons:
            report.append(f"  {path.name}: " + "; ".join(reasons))
        else:
            candidates.append(manifest)
    # Prefer TensorRT, then TensorRT-RTX, then the PyTorch-native format; for text-to-image a plain TensorRT
    # engine before a ControlNet-ready one (which would add zero hints every step).
    order = {"tensorrt": 0, "tensorrt-rtx": 1, "torch-compiled": 2}
    for manifest in sorted(candidates, key=lambda m: (order[m.backend], not places and bool(m.controlnet_places))):
        key = (str(Path(engine_dir).resolve()), manifest.name, manifest.files[0].sha256)
        if cache is not None and key in cache:
            return _with_places(cache[key], places)
        manifest.verify_files(engine_dir)  # checksum before anything is loaded
        engine = _open(manifest, Path(engine_dir), transformer, device, attention_backend)
        if cache is not None:
            cache[key] = engine
        return _with_places(engine, places)
    wanted = f", taking ControlNet hints after main layers {list(places)}" if places else ""
    message = (
        f"no engine in {engine_dir} fits: need a {precision} denoiser for {resolution}, batch {batch}{wanted}, "
        f"GPU compute capability {need.compute_capability}, backends runnable here {sorted(runnable)}.\n"
        + ("\n".join(report) if report else "  (no manifests found)")
        + f"\nBuild one with: {build}"
    )
    return _no_engine(message, allow_fallback, transformer, downscale_log2, precision, places)


def _no_engine(message, allow_fallback, transformer, downscale_log2, precision, places=None) -> DenoiserEngine:
    if not allow_fallback:
        raise EngineNotFound(message)
    warnings.warn(message + "\nallow_fallback=True: running eager PyTorch instead (slower).", stacklevel=3)
    return _with_places(TorchDenoiserEngine(_static(transformer, downscale_log2, precision)), places)


def _with_places(engine: DenoiserEngine, places) -> DenoiserEngine:
    """An eager or torch-compiled engine runs the model's own forward: its denoiser takes the ControlNet's
    places (a TensorRT engine was chosen for its own). None leaves the engine as it is."""
    denoiser = getattr(engine, "denoiser", None)
    if places is not None and denoiser is not None and not isinstance(engine, TensorRTDenoiserEngine):
        denoiser.set_control_places(places)
    return engine


def _static(transformer, downscale_log2, precision: str, fp8_keep=()) -> StaticZImageDenoiser:
    denoiser = StaticZImageDenoiser(transformer, downscale_log2)
    if precision == "fp8":
        denoiser.quantize_fp8(keep=fp8_keep)
    return denoiser


def fp8_keep_in(engine_dir) -> list[str]:
    """Blocks that the FP8 torch-compiled engines in `engine_dir` keep bf16 (their quality policy), so
    that the runtime leaves those blocks unquantised when it converts the model on its way to the GPU."""
    keep: set[str] = set()
    if engine_dir is not None and Path(engine_dir).is_dir():
        for path in find_manifests(engine_dir):
            try:
                manifest = Manifest.read(path)
            except ManifestError:
                continue  # reported when an engine is chosen
            if manifest.precision == "fp8" and manifest.backend == "torch-compiled":
                keep.update(manifest.fp8_keep)
    return sorted(keep)


def runtime_attention_backend(requested: str | None, built: str, device, precision: str | None = None) -> str:
    """The attention kernel to run: the one asked for (an error if it cannot run here), else the one
    the engine was built with where it can run here, else SDPA."""
    if requested not in (None, "auto"):
        return attention.resolve_attention_backend(requested, device)
    if built != "sdpa" and attention.fa3_unavailable_reason(torch.device(device)) is None:
        return built
    return attention.resolve_attention_backend(requested, device, precision=precision) if requested == "auto" else "sdpa"


def _open(manifest: Manifest, folder: Path, transformer, device, attention_backend: str | None = None) -> DenoiserEngine:
    downscale = {k: tuple(v) for k, v in manifest.fp16_downscale_log2.items()}
    if manifest.backend == "torch-compiled":
        torch_compiled.load_artifacts(manifest.file_path(folder, manifest.files[0]).read_bytes())
        # FP8 weights are quantised again from the model's own (deterministic): the engine stores none.
        denoiser = _static(transformer, downscale, manifest.precision, manifest.fp8_keep)
        backend = runtime_attention_backend(attention_backend, manifest.attention_backend, device, manifest.precision)
        denoiser.set_attention_backend(backend)
        denoiser.set_fused_kernels(manifest.fused_kernels)
        log.info("%s; fused kernels %s%s", attention.describe(backend, denoiser.dtype),
                 "on" if manifest.fused_kernels else "off",
                 f"; FP8 blocks kept bf16: {manifest.fp8_keep}" if manifest.fp8_keep else "")
        engine = torch_compiled.CompiledDenoiserEngine(denoiser)
        # Kernels compiled after the build (a ControlNet's, at its first use) are kept beside the engine.
        prefix, identity = f"controlnet-{manifest.name}-", {"engine": manifest.files[0].sha256}
        kept_artifacts.load(folder, prefix, identity)
        engine.keep_kernels = lambda key: kept_artifacts.save(folder, prefix, key, identity,
                                                               "ControlNet's compiled kernels")
        return engine
    if manifest.controlnet_places:
        log.info("%s: ControlNet-ready TensorRT engine, hints after main layers %s", manifest.name,
                 manifest.controlnet_places)
    return TensorRTDenoiserEngine(manifest.file_path(folder, manifest.files[0]), manifest, device)
