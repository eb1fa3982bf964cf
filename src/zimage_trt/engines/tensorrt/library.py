"""One code path for full TensorRT (``import tensorrt``, 10+) and TensorRT-RTX (``import tensorrt_rtx``).

Both libraries expose the same ``nvinfer1`` Python API for everything this project needs (ONNX parser,
builder, optimisation profiles, ``Runtime``/``ICudaEngine``/``IExecutionContext``).  Where they differ,
this module branches on what the imported module *has* (``hasattr``), never on version strings:

* **Target GPUs.**  TensorRT-RTX compiles ahead of time without a GPU and can target named GPU
  generations (``trt.ComputeCapability`` + ``IBuilderConfig.num_compute_capabilities`` /
  ``set_compute_capability``).  Full TensorRT has no such API: it builds (and autotunes) for the GPU it
  runs on, so we only record that GPU's compute capability.
* **Caches.**  Full TensorRT autotunes tactics on the build GPU and persists the timings in a *timing
  cache* (``IBuilderConfig.create_timing_cache`` / ``set_timing_cache``).  TensorRT-RTX does no build-time
  autotuning: its timing-cache API is deprecated and a no-op (and per NVIDIA's docs can force a GPU query,
  defeating CPU-only builds).  What TensorRT-RTX does have is a *runtime cache* of JIT-compiled kernels
  (``IRuntimeConfig.create_runtime_cache``), which :class:`TensorRTEngine` loads/saves.  We therefore use
  the timing cache only where the library has a timing-cache API *and no runtime (JIT) cache API*.
* **Which GPUs run what.**  TensorRT-RTX targets consumer/workstation generations only (7.5, 8.0, 8.6, 8.9,
  12.0, 12.1 in 1.7): its runtime rejects every engine on Hopper (an H100 reported ``UNSUPPORTED_CC`` from
  ``Runtime.get_engine_validity``, whatever the build targets), so data-centre GPUs need full TensorRT.
* **Strong typing.**  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is set wherever the enum has it;
  TensorRT-RTX is always strongly typed (the flag is kept for API compatibility and ignored).

This module finds the library and what it can do; `compiler/tensorrt_build.py` builds engines and
`engines/tensorrt/runtime.py` runs them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: flavor name -> Python module name, in the order "auto" prefers them.
FLAVORS: dict[str, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}

DEFAULT_RTX_COMPUTE_CAPABILITIES_NOTE = (
    "TensorRT-RTX default targets: the current GPU when one is visible and TensorRT-RTX supports it; "
    "otherwise every supported compute capability from 8.0 up (Ampere and newer, i.e. the portable set "
    "TensorRT-RTX itself defaults to). Turing (7.5) is never included implicitly: it needs its own build "
    "and lacks FP32 GEMM/BF16."
)


# --------------------------------------------------------------------------------------------- errors


class TensorRTBackendError(RuntimeError):
    """Base class of this module's errors."""


class BackendUnavailableError(TensorRTBackendError, ImportError):
    """The requested TensorRT flavor cannot be imported (message lists every flavor and why)."""


class EngineBuildError(TensorRTBackendError):
    """The ONNX could not be parsed or the builder failed (message carries TensorRT's own errors)."""


class BuildCancelledError(EngineBuildError):
    """The build was cancelled through the ``cancel`` event; no engine file was written."""


class ProfileError(TensorRTBackendError, ValueError):
    """An optimisation profile does not fit the network, or no built profile fits requested shapes."""


# ----------------------------------------------------------------------------------- backend discovery

def _try_import(flavor: str):
    module_name = FLAVORS[flavor]
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # ImportError, OSError from missing .so files, ...
        reason = f"`import {module_name}` failed: {type(exc).__name__}: {exc}"
        return None, reason


def available_flavors() -> dict[str, tuple[bool, str]]:
    """``{flavor: (available, reason)}``; ``reason`` is the version when available, else the import error."""
    result: dict[str, tuple[bool, str]] = {}
    for flavor, module_name in FLAVORS.items():
        module, reason = _try_import(flavor)
        if module is None:
            result[flavor] = (False, reason)
        else:
            version = getattr(module, "__version__", "unknown version")
            result[flavor] = (True, f"{module_name} {version}")
    return result


def flavor_versions() -> dict[str, str]:
    """``{flavor: version}`` of each importable flavour (what its engines must have been built with)."""
    versions = {}
    for flavor in FLAVORS:
        module, _ = _try_import(flavor)
        if module is not None:
            versions[flavor] = str(getattr(module, "__version__", "unknown"))
    return versions


def describe_flavors(flavors: Mapping[str, tuple[bool, str]]) -> str:
    return "\n".join(f"  - {name}: {'available' if ok else 'unavailable'} ({why})" for name, (ok, why) in flavors.items())


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def import_backend(flavor: str = "auto"):
    """Return ``(flavor, module)``.

    ``"auto"`` picks full TensorRT when it imports *and* a CUDA GPU is visible (full TensorRT cannot
    build or run without one), else TensorRT-RTX, else whichever imports.
    """
    if flavor not in ("auto", *FLAVORS):
        raise ValueError(
            f"unknown TensorRT flavor {flavor!r}: choose 'auto' or one of {list(FLAVORS)}. Backends on this machine:\n"
            + describe_flavors(available_flavors())
        )
    if flavor != "auto":
        module, reason = _try_import(flavor)
        if module is None:
            raise BackendUnavailableError(
                f"TensorRT flavor {flavor!r} is not available: {reason}\nBackends on this machine:\n"
                + describe_flavors(available_flavors())
            )
        return flavor, module
    loaded = {}
    for name in FLAVORS:
        module, _ = _try_import(name)
        if module is not None:
            loaded[name] = module
    if not loaded:
        raise BackendUnavailableError(
            "no TensorRT backend is importable (install `tensorrt` for full TensorRT or "
            "`tensorrt-rtx-cu13` for TensorRT-RTX):\n" + describe_flavors(available_flavors())
        )
    if "tensorrt" in loaded and (cuda_available() or "tensorrt-rtx" not in loaded):
        return "tensorrt", loaded["tensorrt"]
    name = "tensorrt-rtx" if "tensorrt-rtx" in loaded else next(iter(loaded))
    return name, loaded[name]


class Caps:
    """What an imported TensorRT module can do, found by ``hasattr``."""

    def __init__(self, trt):
        config_cls = getattr(trt, "IBuilderConfig", None)
        runtime_config_cls = getattr(trt, "IRuntimeConfig", None)
        flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
        self.strongly_typed_flag = getattr(flag_enum, "STRONGLY_TYPED", None) if flag_enum is not None else None
        self.compute_capability_targets = hasattr(trt, "ComputeCapability") and hasattr(
            config_cls, "set_compute_capability"
        )
        self.runtime_cache = runtime_config_cls is not None and hasattr(runtime_config_cls, "create_runtime_cache")
        self.timing_cache_api = hasattr(config_cls, "create_timing_cache") and hasattr(config_cls, "set_timing_cache")
        # A library with a JIT runtime cache compiles kernels at run time and does no build-time autotuning,
        # so a timing cache has nothing to record (TensorRT-RTX documents it as a deprecated no-op).
        self.timing_cache = self.timing_cache_api and not self.runtime_cache
        self.progress_monitor = hasattr(trt, "IProgressMonitor") and hasattr(config_cls, "progress_monitor")
        self.engine_validity = hasattr(getattr(trt, "Runtime", None), "get_engine_validity")
        self.engine_runtime_config = hasattr(getattr(trt, "ICudaEngine", None), "create_runtime_config")
        self.workspace_pool = hasattr(getattr(trt, "MemoryPoolType", None), "WORKSPACE")


# -------------------------------------------------------------------------------------------- logging

_SEVERITY_TO_LOGGING = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
    "VERBOSE": logging.DEBUG,
}
_loggers: dict[int, Any] = {}


def get_logger(trt):
    """One ``ILogger`` per TensorRT module (TensorRT wants the same logger for every builder/runtime).

    It forwards warnings and errors to Python logging and lets callers capture the errors of one call,
    since TensorRT reports most failures only through the logger (the API call just returns None/False).
    """
    key = id(trt)
    if key in _loggers:
        return _loggers[key]

    class _CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self._local = threading.local()
            self.min_level = logging.WARNING

        def log(self, severity, msg):
            try:
                level = _SEVERITY_TO_LOGGING.get(getattr(severity, "name", str(severity)), logging.INFO)
                if level >= logging.ERROR:
                    for sink in getattr(self._local, "sinks", ()):
                        sink.append(str(msg))
                if level >= self.min_level:
                    log.log(level, "[%s] %s", trt.__name__, msg)
            except BaseException:  # never let an exception cross back into TensorRT
                pass

        @contextlib.contextmanager
        def capture(self):
            sinks = getattr(self._local, "sinks", None)
            if sinks is None:
                sinks = self._local.sinks = []
            errors: list[str] = []
            sinks.append(errors)
            try:
                yield errors
            finally:
                sinks.remove(errors)

    logger = _CapturingLogger()
    _loggers[key] = logger
    return logger


# -------------------------------------------------------------------------------- compute capabilities


def compute_capability_members(trt) -> dict[str, Any]:
    """``{"8.9": trt.ComputeCapability.SM89, ...}`` for the real targets of the enum (not NONE/CURRENT)."""
    out = {}
    for name, member in trt.ComputeCapability.__members__.items():
        if not name.startswith("SM") or not name[2:].isdigit():
            continue
        digits = name[2:]
        out[f"{int(digits[:-1])}.{digits[-1]}"] = member
    return dict(sorted(out.items(), key=lambda kv: compute_capability_key(kv[0])))


def compute_capability_key(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def rtx_supported_compute_capabilities(trt=None) -> list[str]:
    """The compute capabilities the library can target by name, e.g. ``['7.5', '8.0', ..., '12.1']``."""
    if trt is None:
        _, trt = import_backend("tensorrt-rtx")
    if not Caps(trt).compute_capability_targets:
        return []
    return list(compute_capability_members(trt))


def parse_compute_capability(value: Any) -> str:
    """Normalise ``"8.9"``, ``"89"``, ``"sm_89"``, ``"SM89"``, ``8.9``, ``(8, 9)`` or an enum member to ``"8.9"``.

    ``"current"`` is returned as is.  Raises :class:`ValueError` for anything unreadable.
    """
    if hasattr(value, "name") and hasattr(value, "value") and not isinstance(value, (str, int, float)):
        value = value.name  # a ComputeCapability enum member
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().replace("compute_", "").replace("sm_", "").replace("sm", "")
    if text == "current":
        return "current"
    if "." in text:
        major, _, minor = text.partition(".")
        if major.isdigit() and minor.isdigit() and len(minor) == 1:
            return f"{int(major)}.{int(minor)}"
    elif text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{text[-1]}"
    raise ValueError(f"cannot read compute capability {value!r}: write it like '8.9' or '12.0'")


def current_gpu_compute_capability() -> str | None:
    if not cuda_available():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def resolve_rtx_targets(trt, requested) -> tuple[list[str], list[Any], str]:
    """Return ``(labels, enum members, how chosen)`` for TensorRT-RTX's ``set_compute_capability``."""
    members = compute_capability_members(trt)
    supported = ", ".join(members)
    if requested is None:
        current = current_gpu_compute_capability()
        if current is not None and current in members:
            return [current], [members[current]], f"current GPU (sm {current})"
        if current is not None:
            log.warning(
                "this machine's GPU has compute capability %s, which TensorRT-RTX cannot target (supported: %s); "
                "building the portable default set instead",
                current,
                supported,
            )
        labels = [cc for cc in members if compute_capability_key(cc) >= (8, 0)]
        return labels, [members[cc] for cc in labels], "portable default (8.0 and newer)"
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence):
        requested = [requested]
    if not requested:
        raise ValueError(f"compute_capabilities is empty; give at least one of: {supported}")
    labels: list[str] = []
    for item in requested:
        try:
            label = parse_compute_capability(item)
        except ValueError as exc:
            raise ValueError(f"{exc}. TensorRT-RTX {trt.__version__} supports: {supported}") from None
        if label == "current":
            if len(requested) != 1:
                raise ValueError("'current' compute capability must be the only target")
            current = current_gpu_compute_capability()
            if current is None:
                raise ValueError(
                    f"compute capability 'current' needs a visible CUDA GPU and none is; name the targets instead "
                    f"(TensorRT-RTX {trt.__version__} supports: {supported})"
                )
            if current not in members:
                # TensorRT-RTX would build, but the engine is INVALID (UNSUPPORTED_CC) on this GPU.
                raise ValueError(
                    f"this GPU has compute capability {current}, which TensorRT-RTX {trt.__version__} cannot "
                    f"target; supported: {supported}"
                )
            # Resolved here, not left to TensorRT-RTX's CURRENT: the manifest must record the capability
            # itself, or selection would compare the word "current" with the GPU's "8.9" and refuse it.
            return [current], [members[current]], f"current GPU (sm {current})"
        if label not in members:
            raise ValueError(
                f"compute capability {item!r} ({label}) is not supported by TensorRT-RTX {trt.__version__}; "
                f"supported: {supported}"
            )
        if label not in labels:
            labels.append(label)
    return labels, [members[cc] for cc in labels], "requested"



def dims(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)



def torch_dtype(trt_dtype):
    """Map a TensorRT ``DataType`` to a torch dtype (float32/16, bfloat16, int8/32/64, uint8, bool, fp8)."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype)).upper()
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    if hasattr(torch, "float8_e4m3fn"):
        table["FP8"] = torch.float8_e4m3fn  # TensorRT's FP8 is E4M3
    try:
        return table[name]
    except KeyError:
        raise TypeError(f"TensorRT dtype {name} has no torch equivalent here (known: {sorted(table)})") from None
