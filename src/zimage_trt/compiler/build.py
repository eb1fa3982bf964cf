"""Weights -> (fp16 calibration) -> export -> engines -> manifest. Used by `build/build_engines.py`,
`zimage-trt build` and `zimage_trt.build_engines` alike.

Nothing half-built is ever visible: each engine file is written under a name that carries its own
checksum, then the manifest is atomically replaced, and only then are files of the previous build
that nothing names any more removed. An interrupted build leaves the previous engine and manifest
as they were.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engines import contract, torch_compiled
from ..engines.manifest import MANIFEST_SUFFIX, EngineShape, Manifest, ManifestError, record_file
from ..engines.tensorrt import refit
from ..engines.tensorrt.library import available_flavors, parse_compute_capability, rtx_supported_compute_capabilities
from ..files import PARTIAL_SUFFIX, check_writable_dir, publish, sha256_file, staged
from ..model.attention import resolve_attention_backend
from ..model.denoiser import StaticZImageDenoiser
from ..model.precision import check_precision, default_precision, precision_dtype
from ..model.shapes import Resolution, check_caption_capacity, check_fits_rope
from ..model.weights import WeightsError, config_fingerprint, load_transformer, load_vae, weights_fingerprint
from . import tensorrt_build
from .controlnet_places import control_places_of
from .export import export_denoiser
from .fp16_calibration import calibrate_downscale, calibration_inputs
from .fp8_onnx import quantize_onnx_fp8
from .fp8_policy import check_fp8_keep_policy, choose_fp8_keep, fp8_sensitivity

log = logging.getLogger("zimage_trt")
BACKEND_NAMES = ("auto", "torch-compiled", "tensorrt", "tensorrt-rtx")
DEFAULT_CAPTION_CAPACITY = 512  # diffusers' max_sequence_length
# The ONNX graph TensorRT builds from has dynamic latent sides starting at 16 latent pixels (compiler/export.py:
# torch.export needs a dynamic size of at least 2, and 16 leaves room for any patch layout), so 128 px.
TENSORRT_MIN_SIDE = 128


@dataclass
class BuildResult:
    manifest_path: Path
    manifest: Manifest
    seconds: float
    details: dict = field(default_factory=dict)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> TensorRT where it can run, else the PyTorch-native format; errors list what exists."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_NAMES}")
    flavors = available_flavors()
    if backend == "auto":
        if device.type == "cuda" and flavors.get("tensorrt", (False,))[0]:
            return "tensorrt"
        return "torch-compiled"
    if backend in flavors and not flavors[backend][0]:
        status = "; ".join(f"{name}: {'available' if ok else why}" for name, (ok, why) in flavors.items())
        raise RuntimeError(f"backend {backend!r} is not installed or cannot load ({status}; torch-compiled: available)")
    return backend


def default_build_precision(backend: str, device: torch.device) -> str:
    """The default rule for a build of `backend` (resolved) on `device`: is the engine for a GPU?"""
    return default_precision(device.type == "cuda" or backend != "torch-compiled")


def _model_record(transformer, fingerprint: str) -> dict:
    return {
        "class": type(transformer).__name__,
        "config_sha256": config_fingerprint(transformer),
        "weights_fingerprint": fingerprint,
    }


def build_engines(model, resolutions, out_dir="engines", *, backend: str = "auto", precision: str | None = None,
                  batch: int = 1, caption_capacity: int = DEFAULT_CAPTION_CAPACITY, device=None,
                  compute_capabilities=None, name: str | None = None, fp16_downscale_log2=None,
                  keep_onnx: bool = True, progress: bool = True, vae=None, refittable: bool = False,
                  attention_backend: str = "auto", fp8_keep: str = "auto", fused_kernels: bool = True,
                  controlnet=None) -> BuildResult:
    """Build one denoiser engine holding every requested resolution (weights stored once).

    model: a diffusers-format folder, a hub id (at a user's site) or an in-memory
    `ZImageTransformer2DModel` (copied, never modified). resolutions: '1024x1024' strings or pairs.
    precision: None follows the one default rule (model/precision.py): fp16 for an engine that runs on a
    GPU (every CUDA build, and TensorRT built anywhere), fp32 for a torch-compiled build on the CPU.
    vae (torch-compiled engines): an `AutoencoderKL` whose compiled decoder kernels are stored with the
    engine, so the pipeline's first image skips compiling them (~20 s at full size). None: the
    `vae/` of a local model folder, on CUDA builds; False: never. The VAE is copied, never modified.
    refittable (TensorRT): weights can be replaced later without a rebuild (LoRA, `update_weights`); the
    plan is larger and TensorRT may skip weight-specialised kernels. Not for fp8 or torch-compiled.
    attention_backend, fused_kernels (torch-compiled engines): the attention kernel ('auto': FA3 where
    it runs, else SDPA; model/attention.py) and the fused Triton kernels (CUDA) compiled into the engine.
    fp8_keep (FP8 torch-compiled engines): 'auto' measures each block's sensitivity to FP8 and keeps the
    outliers bf16, 'none', or a comma-separated list of block names (compiler/fp8_policy.py).
    controlnet (TensorRT): build the ControlNet-ready variant, whose extra input `controlnet_hints` takes a
    ControlNet's hints after these main layers: a `ZImageControlNetModel`, its diffusers-format folder, one
    .safetensors file, or the places themselves ([0, 2, ...]; compiler/controlnet_places.py). A
    torch-compiled engine takes any ControlNet's hints at run time, so there it is checked against the
    model and changes nothing (the same command builds on a machine where `auto` means torch-compiled).
    All are recorded in the manifest.
    """
    started = time.perf_counter()
    shapes_res = sorted({Resolution.parse(r) for r in ([resolutions] if isinstance(resolutions, str) else resolutions)})
    if not shapes_res:
        raise ValueError("give at least one resolution to build, e.g. '1024x1024'")
    check_caption_capacity(caption_capacity)
    if precision is not None:
        check_precision(precision)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 64:
        raise ValueError(f"batch must be an int in 1..64, got {batch!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(backend, device)
    precision = precision or default_build_precision(backend, device)
    if backend != "torch-compiled" and min(min(r.height, r.width) for r in shapes_res) < TENSORRT_MIN_SIDE:
        small = [r.key for r in shapes_res if min(r.height, r.width) < TENSORRT_MIN_SIDE]
        raise ValueError(f"{backend} engines need sides of at least {TENSORRT_MIN_SIDE} px (the exported graph's "
                         f"latent sides start at 16), got {small}; build those with --backend torch-compiled")
    target_dtype = precision_dtype(precision, backend)
    if precision == "fp8":
        compute_capabilities = _fp8_targets(backend, compute_capabilities)
    if refittable and backend == "torch-compiled":
        raise ValueError("refittable applies to TensorRT engines: a torch-compiled engine runs the model's own "
                         "weights, which take new values in place")
    if refittable and precision == "fp8":
        raise ValueError("refittable FP8 engines are not supported: their weights are stored quantised with scales "
                         "computed at build time; build fp16/bf16 for adapters, or rebuild the FP8 engine")
    out_dir = check_writable_dir(out_dir)
    attention_backend = (resolve_attention_backend(attention_backend, device, precision=precision)
                         if backend == "torch-compiled" else "sdpa")
    fp8_keep = check_fp8_keep_policy(fp8_keep)
    control_places = control_places_of(controlnet)
    if fp8_keep != "none" and precision == "fp8" and backend != "torch-compiled" and fp8_keep != "auto":
        raise ValueError(f"--fp8-keep {fp8_keep!r} applies to torch-compiled FP8 engines; {backend} FP8 engines "
                         "quantise every block (use --fp8-keep none or auto)")
    variant = f"-controlnet-{'-'.join(map(str, control_places))}" if control_places and backend != "torch-compiled" else ""
    plan = BuildPlan(
        model=model, out_dir=out_dir, name=name or f"denoiser-{backend}-{precision}{variant}", backend=backend,
        precision=precision, target_dtype=target_dtype, device=device,
        shapes=[EngineShape(r.key, batch, caption_capacity) for r in shapes_res],
        compute_capabilities=compute_capabilities, fp16_downscale_log2=fp16_downscale_log2,
        keep_onnx=keep_onnx, progress=progress, vae=vae, refittable=bool(refittable),
        attention_backend=attention_backend,
        fp8_keep=fp8_keep, fused_kernels=bool(fused_kernels) and backend == "torch-compiled" and device.type == "cuda",
        control_places=control_places,
    )
    with _exclusive_build(plan.out_dir, plan.name):
        return _build_locked(plan, started)


@dataclass
class BuildPlan:
    """What build_engines was asked for, checked."""

    model: object
    out_dir: Path
    name: str
    backend: str
    precision: str
    target_dtype: torch.dtype
    device: torch.device
    shapes: list
    compute_capabilities: list | None
    fp16_downscale_log2: dict | None
    keep_onnx: bool
    progress: bool
    vae: object = None
    refittable: bool = False
    attention_backend: str = "sdpa"
    fp8_keep: str = "auto"
    fused_kernels: bool = False
    control_places: tuple = ()


def _build_locked(plan: BuildPlan, started: float) -> BuildResult:
    model, out_dir, name, backend, precision = plan.model, plan.out_dir, plan.name, plan.backend, plan.precision
    shapes, device = plan.shapes, plan.device
    bar = tqdm(total=4, desc=f"build {name}", disable=not plan.progress)

    # 1. Weights, in a wide dtype for calibration (bf16 on GPU: a 6B model in fp32 is 24 GB).
    wide = torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(model, torch.nn.Module):
        transformer = torch.nn.Module.to(copy.deepcopy(model), device=device, dtype=wide)
    else:
        transformer = load_transformer(model, torch_dtype=wide, device=device)
    transformer.eval().requires_grad_(False)
    # Fingerprint of the weights as the user holds them (stored dtype), so the runtime can recompute it.
    fingerprint = weights_fingerprint(model)
    denoiser = StaticZImageDenoiser(transformer)
    if denoiser.max_caption_capacity < shapes[0].caption_capacity:
        raise ValueError(f"caption capacity {shapes[0].caption_capacity} exceeds this model's RoPE table "
                         f"({denoiser.max_caption_capacity})")
    for shape in shapes:
        check_fits_rope(Resolution.parse(shape.resolution), transformer.config.axes_lens)
    denoiser.set_control_places(plan.control_places)  # (a ControlNet that does not fit is refused here)
    if backend == "torch-compiled":
        denoiser.set_control_places(())  # its engines take hints at run time: nothing to build for them
    bar.update()

    # 2. fp16 overflow protection, measured on this model's own weights.
    downscale = {}
    if plan.target_dtype == torch.float16:
        given = plan.fp16_downscale_log2
        downscale = given if given is not None else calibrate_downscale(denoiser)
        denoiser.set_downscale(downscale)
    torch.nn.Module.to(transformer, plan.target_dtype)  # (diffusers' own .to() warns needlessly)
    keep, sensitivity = [], {}
    if precision == "fp8" and backend == "torch-compiled":
        # 3. FP8 quality policy: measured on this model's own weights, before quantising.
        names = [n for n, _ in denoiser.named_blocks()]
        if plan.fp8_keep == "auto":
            with torch.no_grad():
                sensitivity = fp8_sensitivity(denoiser, calibration_inputs(denoiser))
        keep = choose_fp8_keep(plan.fp8_keep, sensitivity, names)
        denoiser.quantize_fp8(keep=keep)
        log.info("FP8 policy %s: %d of %d blocks kept bf16 %s", plan.fp8_keep, len(keep), len(names), keep)
    if backend == "torch-compiled":
        denoiser.set_attention_backend(plan.attention_backend)
        denoiser.set_fused_kernels(plan.fused_kernels)
    bar.update()

    # 3-4. The engine itself.
    details: dict = {"controlnet_places": list(denoiser.control_places)}
    if plan.control_places and backend == "torch-compiled":
        details["controlnet"] = "torch-compiled engines take any ControlNet's hints at run time: nothing built for it"
        log.info("%s: --controlnet checked against the model; %s", name, details["controlnet"])
    with torch.no_grad():
        if backend == "torch-compiled":
            vae = _vae_for_build(plan)
            engine_files, backend_version, ccs = _build_torch_compiled(denoiser, shapes, out_dir, name, device, vae,
                                                                       plan.progress)
            details["vae_decoder_compiled"] = vae is not None
        else:
            engine_files, backend_version, ccs, trt_details = _build_tensorrt(
                denoiser, shapes, out_dir, name, backend, plan.compute_capabilities, plan.keep_onnx, plan.progress,
                fp8=precision == "fp8", refit_from=transformer.state_dict() if plan.refittable else None)
            details.update(trt_details)
    bar.update()

    manifest = Manifest(
        name=name, component="denoiser", backend=backend, backend_version=backend_version, precision=precision,
        shapes=shapes, files=[record_file(p) for p in engine_files], compute_capabilities=ccs,
        torch_version=torch.__version__, model=_model_record(transformer, fingerprint),
        fp16_downscale_log2={k: list(v) for k, v in downscale.items()}, onnx_sha256=details.get("onnx_sha256"),
        attention_backend=plan.attention_backend, fused_kernels=plan.fused_kernels, fp8_keep=keep,
        fp8_sensitivity={k: round(v, 6) for k, v in sensitivity.items()},
        build_seconds=round(time.perf_counter() - started, 3),
        refittable=bool(details.get("refit_weights")), refit_weights=details.get("refit_weights", {}),
        controlnet_places=details["controlnet_places"], controlnet_hint_shapes=details.get("controlnet_hint_shapes", []),
    )
    previous = _previous_files(out_dir, name)
    path = manifest.write(out_dir)
    _remove_unreferenced(out_dir, previous, {f.name for f in manifest.files})
    bar.update()
    bar.close()
    # The build's copy of the weights must not outlive the build. It sits in reference cycles (modules <->
    # compiled code), so dropping the names is not enough: by now it is in Python's oldest GC generation,
    # which may go uncollected for a long time (a process that built then generated held the weights
    # twice). Drop dynamo's caches and collect.
    del denoiser, transformer
    if backend == "torch-compiled":
        torch._dynamo.reset()
    gc.collect()
    return BuildResult(path, manifest, time.perf_counter() - started, details)


@contextlib.contextmanager
def _exclusive_build(out_dir: Path, name: str):
    """One build of a given engine name per folder at a time (an OS lock, released even on SIGKILL).

    Holding it, any temporary file of this name is a leftover of a killed build: remove it.
    """
    fd = os.open(out_dir / f".{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build of {name!r} is running in {out_dir}; wait for it or use another --name") from None
        for stale in [*out_dir.glob(f".{name}.*{PARTIAL_SUFFIX}"), *out_dir.glob(f"..{name}.*{PARTIAL_SUFFIX}")]:
            stale.unlink(missing_ok=True)
        for stale in (out_dir / "onnx").glob(f".{name}.onnx.export-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _content_named(out_dir: Path, name: str, suffix: str, write) -> Path:
    """Write via `write(tmp_path)`, then publish as NAME.<sha12><suffix>: earlier files stay untouched,
    and a failure or interrupt removes the temporary file."""
    with staged(out_dir, name) as tmp:
        write(tmp)
        return publish(tmp, out_dir / f"{name}.{sha256_file(tmp)[:12]}{suffix}")


def _vae_for_build(plan: BuildPlan):
    """A VAE of the build's own, in the dtype the pipeline runs this engine with, or None.
    (`compile_vae_decoder` puts it in eval mode without gradients, as the pipeline's.)"""
    source = plan.vae
    if source is False:
        return None
    dtype = plan.target_dtype  # (torch-compiled builds only: for fp8 that is its bf16, as the pipeline's)
    if source is not None:  # the caller's module: compile a copy, never theirs
        return torch.nn.Module.to(copy.deepcopy(source), device=plan.device, dtype=dtype)
    folder = Path(plan.model) if isinstance(plan.model, (str, os.PathLike)) else None
    if plan.device.type != "cuda" or folder is None or not (folder / "vae" / "config.json").is_file():
        return None
    try:
        vae = load_vae(folder, dtype)  # loaded for the build alone: no copy needed
    except Exception as e:
        raise WeightsError(f"{folder / 'vae'}: cannot load the VAE whose decoder the build compiles ({e}); "
                           "fix the folder or pass vae=False to build without it") from e
    return vae.to(plan.device)


def _build_torch_compiled(denoiser, shapes, out_dir, name, device, vae, progress):
    torch._dynamo.reset()  # artefacts must hold exactly this engine's graphs
    engine = torch_compiled.CompiledDenoiserEngine(denoiser)
    cap_dim = denoiser.caption_dim
    with tqdm(total=len(shapes) * (2 if vae is not None else 1), desc="compile shapes", leave=False,
              disable=not progress) as bar:
        torch_compiled.warm_up(engine, shapes, cap_dim, progress=bar)
        if vae is not None:
            torch_compiled.compile_vae_decoder(vae)
            torch_compiled.compile_vae_encoder(vae)  # (the image tasks' inputs)
            torch_compiled.warm_up_vae_decoder(vae, shapes, progress=bar, encoder=True)
    data = torch_compiled.save_artifacts()
    path = _content_named(out_dir, name, torch_compiled.ARTIFACT_SUFFIX, lambda p: p.write_bytes(data))
    ccs = []
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        ccs = [f"{major}.{minor}"]
    return [path], torch.__version__, ccs


def _fp8_targets(backend: str, requested) -> list[str] | None:
    """FP8 tensor cores start at compute capability 8.9 (Ada); refuse older targets up front."""
    if backend == "torch-compiled":
        return requested

    def key(cc):
        return tuple(int(v) for v in cc.split("."))

    if requested is None:
        if backend == "tensorrt":
            return None  # full TensorRT builds for the GPU it runs on
        return [cc for cc in rtx_supported_compute_capabilities() if key(cc) >= (8, 9)]
    chosen = [parse_compute_capability(cc) for cc in requested]
    too_old = [cc for cc in chosen if key(cc) < (8, 9)]
    if too_old:
        raise ValueError(f"FP8 engines need compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                         f"{too_old} cannot run them: build fp16/bf16 for those GPUs")
    return chosen


def _build_tensorrt(denoiser, shapes, out_dir, name, flavor, compute_capabilities, keep_onnx, progress, fp8=False,
                    refit_from=None):
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    onnx_path = onnx_dir / f"{name}.onnx"
    # FP8: export 16-bit first, then write the Q/DQ graph as NAME.onnx.
    export_path = onnx_dir / f"{name}.fp16.onnx" if fp8 else onnx_path
    max_side = max(max(Resolution.parse(s.resolution).latent_hw) for s in shapes)
    places = denoiser.control_places
    export_info = export_denoiser(denoiser, export_path, max_batch=max(16, shapes[0].batch),
                                  max_capacity=max(512, shapes[0].caption_capacity),
                                  max_latent_side=max(256, max_side), verify=denoiser.dtype == torch.float32)
    if fp8:
        # Q/DQ on the block projections, activation scales calibrated with onnxruntime on small inputs.
        latents, timestep, cap, lens = calibration_inputs(denoiser, caption_len=32)
        # (ControlNet-ready: calibrated on zero hints, the text-to-image statistics; a ControlNet's own
        # residuals are not known at build time.)
        hints = None if not places else torch.zeros(contract.hint_shape(
            len(places), latents.shape[0], tuple(latents.shape[-2:]), cap.shape[1], denoiser.dim), dtype=denoiser.dtype)
        feed = contract.as_feed((latents, timestep, cap.to(denoiser.dtype), lens), controlnet_hints=hints)
        export_info["fp8"] = quantize_onnx_fp8(export_path, onnx_path, [{k: v.cpu().numpy() for k, v in feed.items()}])
        export_info["sha256"] = sha256_file(onnx_path)
    if places:  # the ControlNet-ready variant: each profile also fixes the hints' shape
        profiles = [contract.controlnet_input_shapes(len(places), s.batch, Resolution.parse(s.resolution).latent_hw,
                                                     s.caption_capacity, denoiser.caption_dim, denoiser.dim)
                    for s in shapes]
    else:
        profiles = [contract.input_shapes(s.batch, Resolution.parse(s.resolution).latent_hw, s.caption_capacity,
                                          denoiser.caption_dim) for s in shapes]
    suffix = ".plan"
    info = {}
    refit_weights = {}
    if refit_from is not None:
        # Which transformer weight each ONNX initializer holds (the exporter renames and transposes them).
        refit_weights = refit.map_initializers(onnx_path, refit_from)
        if not refit_weights:
            raise RuntimeError(f"refittable build: no initializer of {onnx_path} holds a transformer weight")

    def write(tmp):
        info.update(tensorrt_build.build_tensorrt_engine(
            onnx_path, tmp, profiles, flavor=flavor, compute_capabilities=compute_capabilities,
            timing_cache_path=out_dir / f"{flavor}.timing.cache", progress=progress, refittable=refit_from is not None))

    path = _content_named(out_dir, name, suffix, write)
    if not keep_onnx:
        for f in onnx_dir.glob(onnx_path.name + "*"):
            f.unlink()
    details = {"onnx": export_info, "engine": info, "onnx_sha256": export_info["sha256"]}
    if places:
        details["controlnet_hint_shapes"] = [list(p[contract.CONTROLNET_HINTS]) for p in profiles]
    if refit_from is not None:
        details["refit_weights"] = refit_weights
        details["not_refittable"] = refit.unmapped_weights(refit_weights, refit_from)
    return [path], str(info.get("version", "")), list(info.get("compute_capabilities", [])), details


def _previous_files(out_dir: Path, name: str) -> set[str]:
    path = out_dir / f"{name}{MANIFEST_SUFFIX}"
    if not path.exists():
        return set()
    try:
        return {f.name for f in Manifest.read(path).files}
    except ManifestError:
        return set()


def _remove_unreferenced(out_dir: Path, previous: set[str], current: set[str]) -> None:
    for stale in previous - current:
        (out_dir / stale).unlink(missing_ok=True)
