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

Build::

    info = build_tensorrt_engine("transformer.onnx", "engines/t.plan",
                                 [{"latents": (1, 16, 128, 128), ...}, {"latents": (1, 16, 96, 160), ...}],
                                 flavor="tensorrt-rtx", compute_capabilities=["8.9", "12.0"])

Run::

    eng = TensorRTEngine("engines/t.plan")
    eng.select({"latents": (1, 16, 128, 128), ...})        # allocates persistent buffers once
    out = eng.infer({"latents": x, ...}, stream)            # enqueues on ``stream``, no host sync
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_path

__all__ = [
    "FLAVORS",
    "DEFAULT_RTX_COMPUTE_CAPABILITIES_NOTE",
    "TensorRTBackendError",
    "BackendUnavailableError",
    "EngineBuildError",
    "BuildCancelledError",
    "ProfileError",
    "available_flavors",
    "import_backend",
    "rtx_supported_compute_capabilities",
    "parse_compute_capability",
    "build_tensorrt_engine",
    "make_progress_monitor",
    "torch_dtype",
    "TensorRTEngine",
]

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

_import_failures: dict[str, str] = {}


def _try_import(flavor: str):
    module_name = FLAVORS[flavor]
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # ImportError, OSError from missing .so files, ...
        reason = f"`import {module_name}` failed: {type(exc).__name__}: {exc}"
        _import_failures[flavor] = reason
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


def _describe_flavors(flavors: Mapping[str, tuple[bool, str]]) -> str:
    return "\n".join(f"  - {name}: {'available' if ok else 'unavailable'} ({why})" for name, (ok, why) in flavors.items())


def _cuda_available() -> bool:
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
            + _describe_flavors(available_flavors())
        )
    if flavor != "auto":
        module, reason = _try_import(flavor)
        if module is None:
            raise BackendUnavailableError(
                f"TensorRT flavor {flavor!r} is not available: {reason}\nBackends on this machine:\n"
                + _describe_flavors(available_flavors())
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
            "`tensorrt-rtx-cu13` for TensorRT-RTX):\n" + _describe_flavors(available_flavors())
        )
    if "tensorrt" in loaded and (_cuda_available() or "tensorrt-rtx" not in loaded):
        return "tensorrt", loaded["tensorrt"]
    name = "tensorrt-rtx" if "tensorrt-rtx" in loaded else next(iter(loaded))
    return name, loaded[name]


class _Caps:
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


def _get_logger(trt):
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


def _cc_members(trt) -> dict[str, Any]:
    """``{"8.9": trt.ComputeCapability.SM89, ...}`` for the real targets of the enum (not NONE/CURRENT)."""
    out = {}
    for name, member in trt.ComputeCapability.__members__.items():
        if not name.startswith("SM") or not name[2:].isdigit():
            continue
        digits = name[2:]
        out[f"{int(digits[:-1])}.{digits[-1]}"] = member
    return dict(sorted(out.items(), key=lambda kv: _cc_key(kv[0])))


def _cc_key(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def rtx_supported_compute_capabilities(trt=None) -> list[str]:
    """The compute capabilities the library can target by name, e.g. ``['7.5', '8.0', ..., '12.1']``."""
    if trt is None:
        _, trt = import_backend("tensorrt-rtx")
    if not _Caps(trt).compute_capability_targets:
        return []
    return list(_cc_members(trt))


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


def _current_gpu_cc() -> str | None:
    if not _cuda_available():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _resolve_rtx_targets(trt, requested) -> tuple[list[str], list[Any], str]:
    """Return ``(labels, enum members, how chosen)`` for TensorRT-RTX's ``set_compute_capability``."""
    members = _cc_members(trt)
    supported = ", ".join(members)
    if requested is None:
        current = _current_gpu_cc()
        if current is not None and current in members:
            return [current], [members[current]], f"current GPU (sm {current})"
        if current is not None:
            log.warning(
                "this machine's GPU has compute capability %s, which TensorRT-RTX cannot target (supported: %s); "
                "building the portable default set instead",
                current,
                supported,
            )
        labels = [cc for cc in members if _cc_key(cc) >= (8, 0)]
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
            current = _current_gpu_cc()
            if current is not None and current not in members:
                # TensorRT-RTX would build, but the engine is INVALID (UNSUPPORTED_CC) on this GPU.
                raise ValueError(
                    f"this GPU has compute capability {current}, which TensorRT-RTX {trt.__version__} cannot "
                    f"target; supported: {supported}"
                )
            return ["current"], [trt.ComputeCapability.CURRENT], "current GPU (resolved by TensorRT-RTX)"
        if label not in members:
            raise ValueError(
                f"compute capability {item!r} ({label}) is not supported by TensorRT-RTX {trt.__version__}; "
                f"supported: {supported}"
            )
        if label not in labels:
            labels.append(label)
    return labels, [members[cc] for cc in labels], "requested"


# ---------------------------------------------------------------------------------- progress monitor


class _ProgressLogic:
    """tqdm bars for TensorRT's phases plus cancellation; mixed into a ``trt.IProgressMonitor`` subclass.

    TensorRT calls these methods from its own threads (or the building thread), so all state is guarded
    by a lock and no exception is ever allowed to propagate back into TensorRT: an exception (a
    KeyboardInterrupt included) cancels the build and is remembered for the caller to re-raise.
    """

    def _setup(self, show: bool, cancel: threading.Event | None, max_bar_depth: int):
        self.show = show
        self.cancel_event = cancel
        self.max_bar_depth = max_bar_depth
        self.interrupted: BaseException | None = None
        self.cancelled = False
        self.phases_seen: list[str] = []
        self._lock = threading.Lock()
        self._bars: dict[str, tuple[Any, int]] = {}

    def _should_stop(self) -> bool:
        return self.interrupted is not None or (self.cancel_event is not None and self.cancel_event.is_set())

    def phase_start(self, phase_name, parent_phase, num_steps):
        try:
            with self._lock:
                self.phases_seen.append(phase_name)
                depth = self._bars[parent_phase][1] + 1 if parent_phase in self._bars else 0
                bar = None
                if self.show and depth <= self.max_bar_depth:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=int(num_steps), desc=str(phase_name), position=depth, leave=depth == 0,
                               dynamic_ncols=True, unit="step")
                self._bars[phase_name] = (bar, depth)
        except BaseException as exc:  # noqa: BLE001
            self._note(exc)

    def step_complete(self, phase_name, step):
        try:
            with self._lock:
                bar = self._bars.get(phase_name, (None, 0))[0]
                if bar is not None:
                    bar.update(max(0, int(step) + 1 - bar.n))
            if self._should_stop():
                self.cancelled = True
                return False
            return True
        except BaseException as exc:  # noqa: BLE001
            self._note(exc)
            self.cancelled = True
            return False

    def phase_finish(self, phase_name):
        try:
            with self._lock:
                bar = self._bars.pop(phase_name, (None, 0))[0]
                if bar is not None:
                    bar.close()
        except BaseException as exc:  # noqa: BLE001
            self._note(exc)

    def close(self):
        with self._lock:
            for bar, _ in self._bars.values():
                if bar is not None:
                    bar.close()
            self._bars.clear()

    def _note(self, exc: BaseException):
        if isinstance(exc, KeyboardInterrupt):
            self.interrupted = exc
        else:
            log.warning("progress monitor error ignored: %r", exc)


_monitor_classes: dict[int, type] = {}


def make_progress_monitor(trt, *, show: bool = True, cancel: threading.Event | None = None, max_bar_depth: int = 2):
    """An instance of a ``trt.IProgressMonitor`` subclass that draws tqdm bars and honours ``cancel``.

    Setting ``cancel`` makes the next ``step_complete`` return False, which makes TensorRT abandon the build.
    The returned object must outlive the build (keep a reference).
    """
    cls = _monitor_classes.get(id(trt))
    if cls is None:
        base = trt.IProgressMonitor

        def __init__(self, show, cancel, max_bar_depth):
            base.__init__(self)
            self._setup(show, cancel, max_bar_depth)

        cls = type("TensorRTProgressMonitor", (_ProgressLogic, base), {"__init__": __init__})
        _monitor_classes[id(trt)] = cls
    return cls(show, cancel, max_bar_depth)


@contextlib.contextmanager
def _sigint_cancels(monitor: _ProgressLogic | None):
    """While building, turn Ctrl-C into a cancellation (the build stops at its next step) + KeyboardInterrupt.

    TensorRT calls the progress monitor on the building thread; a KeyboardInterrupt raised there would be
    swallowed by the bindings. So in the main thread we install a handler that only records the
    interrupt; the build function re-raises it once TensorRT has returned and nothing has been written.
    """
    if monitor is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        monitor.interrupted = KeyboardInterrupt()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):  # not the main interpreter / signals unavailable
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------- file helpers


def _atomic_write(path: Path, data) -> int:
    """Whole-or-nothing write (see files.atomic_path); returns the byte count."""
    view = memoryview(data).cast("B")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(view)
    return view.nbytes


def _dims(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


# ------------------------------------------------------------------------------------------- building


def _parse_onnx(trt, builder, logger, onnx_path: Path, caps: _Caps):
    flags = 0
    if caps.strongly_typed_flag is not None:
        flags |= 1 << int(caps.strongly_typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with logger.capture() as logged:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = []
            with contextlib.suppress(Exception):
                if err.node() >= 0:
                    where.append(f"node {err.node()} {err.node_name()!r} ({err.node_operator()})")
            errors.append(f"  [{i + 1}] {err.code().name if hasattr(err.code(), 'name') else err.code()}: "
                          f"{err.desc()}" + (f" at {', '.join(where)}" if where else ""))
        if not errors:
            errors = [f"  {m}" for m in logged] or ["  (TensorRT reported no details)"]
        raise EngineBuildError(
            f"TensorRT's ONNX parser ({trt.__name__}) could not parse {onnx_path}: "
            f"{len(errors)} error(s):\n" + "\n".join(errors)
        )
    if network.num_outputs == 0:
        # Protobuf decoding is lenient: some non-ONNX bytes "parse" into an empty model.
        raise EngineBuildError(
            f"TensorRT's ONNX parser ({trt.__name__}) read {onnx_path} but found no graph outputs "
            f"({network.num_inputs} inputs, {network.num_layers} layers): could not parse it as a usable ONNX model"
        )
    strongly_typed = None
    if caps.strongly_typed_flag is not None and hasattr(network, "get_flag"):
        strongly_typed = bool(network.get_flag(caps.strongly_typed_flag))
    return network, parser, strongly_typed


def _network_io(network) -> tuple[dict[str, dict], dict[str, dict]]:
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = {"shape": _dims(t.shape), "dtype": t.dtype.name, "shape_tensor": bool(getattr(t, "is_shape_tensor", False))}
    outputs = {}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs[t.name] = {"shape": _dims(t.shape), "dtype": t.dtype.name}
    return inputs, outputs


def _check_profiles(profiles, inputs: Mapping[str, dict], onnx_path: Path) -> list[dict[str, tuple[int, ...]]]:
    """Validate every profile against the network inputs; fill in fully static inputs."""
    if isinstance(profiles, Mapping) or not isinstance(profiles, Sequence):
        raise ProfileError(
            f"profiles must be a list of {{input_name: shape}} dicts (one per optimisation profile), got {type(profiles).__name__}"
        )
    dynamic = [name for name, info in inputs.items() if any(d < 0 for d in info["shape"])]
    if dynamic and not profiles:
        raise ProfileError(f"{onnx_path.name} has dynamic inputs {dynamic}: give at least one profile")
    checked = []
    described = ", ".join(f"{n}{list(i['shape'])}" for n, i in inputs.items())
    for index, profile in enumerate(profiles):
        if not isinstance(profile, Mapping):
            raise ProfileError(f"profile #{index} must be a dict {{input_name: shape}}, got {type(profile).__name__}")
        unknown = sorted(set(profile) - set(inputs))
        if unknown:
            raise ProfileError(f"profile #{index} names {unknown}, which are not inputs of {onnx_path.name}; inputs: {described}")
        missing = [name for name in dynamic if name not in profile]
        if missing:
            raise ProfileError(
                f"profile #{index} is missing dynamic input(s) {missing} of {onnx_path.name}; "
                f"every profile must give a shape for each of {dynamic} (inputs: {described})"
            )
        fixed: dict[str, tuple[int, ...]] = {}
        for name, info in inputs.items():
            net_shape = info["shape"]
            if name not in profile:
                fixed[name] = net_shape  # fully static input
                continue
            try:
                shape = _dims(profile[name])
            except (TypeError, ValueError):
                raise ProfileError(f"profile #{index}: shape of {name!r} must be a tuple of ints, got {profile[name]!r}") from None
            if len(shape) != len(net_shape):
                raise ProfileError(
                    f"profile #{index}: {name!r} has rank {len(net_shape)} {list(net_shape)} in {onnx_path.name} "
                    f"but the profile gives rank {len(shape)} {list(shape)}"
                )
            for axis, (want, got) in enumerate(zip(net_shape, shape)):
                if got <= 0 and not info["shape_tensor"]:
                    raise ProfileError(f"profile #{index}: {name!r} dim {axis} must be positive, got {list(shape)}")
                if want >= 0 and want != got:
                    raise ProfileError(
                        f"profile #{index}: {name!r} dim {axis} is fixed to {want} in {onnx_path.name} "
                        f"(shape {list(net_shape)}) but the profile gives {got}"
                    )
            fixed[name] = shape
        checked.append(fixed)
    return checked


def _load_timing_cache(config, path: Path | None) -> tuple[Any, int]:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as exc:  # corrupt / other version: start fresh
        log.warning("ignoring unusable timing cache %s (%s)", path, exc)
        data = b""
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        log.warning("TensorRT refused timing cache %s; starting a fresh one", path)
        data = b""
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)
    return cache, len(data)


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    profiles: Sequence[Mapping[str, Sequence[int]]],
    *,
    flavor: str = "auto",
    compute_capabilities: Sequence[str] | str | None = None,
    timing_cache_path: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
) -> dict:
    """Build one engine holding one fixed-shape optimisation profile per entry of ``profiles``.

    ``profiles``: list of ``{input_name: shape}``; each becomes a profile with min = opt = max = shape.
    Every dynamic network input must appear in every profile; fully static inputs may be omitted.
    The network is created strongly typed, so the ONNX's own dtypes decide the precision.

    ``compute_capabilities``: TensorRT-RTX targets (``"8.9"``, ``"12.0"``, ``"current"`` ...); see
    :data:`DEFAULT_RTX_COMPUTE_CAPABILITIES_NOTE` for the default.  Full TensorRT builds for the GPU it
    runs on; there the argument may only name that GPU, and its capability is recorded.

    ``timing_cache_path``: full TensorRT loads it if present and saves it (atomically) after a
    successful build.  TensorRT-RTX has no build-time autotuning (its timing cache is a no-op), so the
    path is ignored there and ``info["timing_cache"]["used"]`` is False; use
    ``TensorRTEngine(runtime_cache_path=...)`` for its JIT kernel cache instead.

    ``cancel``: set this event (from any thread) to stop the build; raises :class:`BuildCancelledError`.
    Ctrl-C during the build also stops it (KeyboardInterrupt is re-raised).  In every failure case the
    engine is never partially written and a previous file at ``engine_path`` is left intact.

    Returns an info dict: flavor, library/version, build_seconds, engine_path, engine_bytes, profiles,
    compute_capabilities, inputs/outputs (shape with -1 for dynamic dims, dtype), strongly_typed, timing_cache.
    """
    onnx_path = Path(onnx_path).resolve()
    engine_path = Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    flavor, trt = import_backend(flavor)
    caps = _Caps(trt)
    logger = _get_logger(trt)

    # Targets first: cheap argument errors before any heavy work.
    cc_labels: list[str]
    cc_members: list[Any] = []
    cc_how: str
    if caps.compute_capability_targets:
        cc_labels, cc_members, cc_how = _resolve_rtx_targets(trt, compute_capabilities)
    else:
        current = _current_gpu_cc()
        if compute_capabilities is not None:
            wanted = compute_capabilities if isinstance(compute_capabilities, (list, tuple)) else [compute_capabilities]
            labels = {parse_compute_capability(c) for c in wanted} - {"current"}
            if labels and labels != {current}:
                raise ValueError(
                    f"{trt.__name__} {trt.__version__} cannot target other GPUs: it builds for the GPU it runs on "
                    f"(compute capability {current or 'unknown: no CUDA GPU visible'}); asked for {sorted(labels)}"
                )
        cc_labels, cc_how = ([current] if current else []), "build GPU"

    with logger.capture() as logged:
        builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError(f"{trt.__name__}.Builder could not be created:\n  " + "\n  ".join(logged or ["(no details)"]))
    network, parser, strongly_typed = _parse_onnx(trt, builder, logger, onnx_path, caps)
    inputs, outputs = _network_io(network)
    checked = _check_profiles(profiles, inputs, onnx_path)

    config = builder.create_builder_config()
    for index, profile_shapes in enumerate(checked):
        profile = builder.create_optimization_profile()
        for name, shape in profile_shapes.items():
            if inputs[name]["shape_tensor"]:
                profile.set_shape_input(name, shape, shape, shape)
            else:
                profile.set_shape(name, shape, shape, shape)
        if config.add_optimization_profile(profile) < 0:
            raise ProfileError(f"TensorRT rejected profile #{index} {profile_shapes}")

    if cc_members:
        config.num_compute_capabilities = len(cc_members)
        for i, member in enumerate(cc_members):
            if not config.set_compute_capability(member, i):
                raise ValueError(f"{trt.__name__} refused compute capability {cc_labels[i]}")
    if workspace_bytes is not None and caps.workspace_pool:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))

    timing_path = Path(timing_cache_path) if timing_cache_path is not None else None
    timing_info: dict[str, Any] = {"path": str(timing_path) if timing_path else None, "used": False}
    if timing_path is not None and caps.timing_cache:
        _, loaded = _load_timing_cache(config, timing_path)
        timing_info.update(used=True, loaded_bytes=loaded)
    elif timing_path is not None:
        timing_info["reason"] = (
            f"{trt.__name__} does no build-time autotuning (it JIT-compiles kernels on the target GPU), so a "
            "timing cache does not apply; use TensorRTEngine(runtime_cache_path=...) for its runtime cache"
            if caps.runtime_cache
            else f"{trt.__name__} has no timing-cache API"
        )

    monitor = None
    if caps.progress_monitor:  # also without bars: it is what makes Ctrl-C / cancel stop the build promptly
        monitor = make_progress_monitor(trt, show=bool(progress), cancel=cancel)
        config.progress_monitor = monitor
    elif cancel is not None:
        raise TensorRTBackendError(f"{trt.__name__} has no IProgressMonitor: a build cannot be cancelled")

    started = time.perf_counter()
    try:
        with _sigint_cancels(monitor), logger.capture() as logged:
            serialized = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    build_seconds = time.perf_counter() - started
    if monitor is not None and monitor.interrupted is not None:
        raise KeyboardInterrupt("TensorRT build interrupted; no engine written")
    if serialized is None or (monitor is not None and monitor.cancelled):
        if monitor is not None and monitor.cancelled:
            raise BuildCancelledError(
                f"engine build for {onnx_path.name} was cancelled after {build_seconds:.1f}s; "
                f"{engine_path} was not written"
            )
        raise EngineBuildError(
            f"{trt.__name__} failed to build an engine from {onnx_path}:\n  " + "\n  ".join(logged or ["(no details logged)"])
        )

    engine_bytes = _atomic_write(engine_path, serialized)
    del serialized

    if timing_info["used"]:
        with contextlib.suppress(Exception):
            data = config.get_timing_cache().serialize()
            timing_info["saved_bytes"] = _atomic_write(timing_path, data)

    return {
        "flavor": flavor,
        "library": trt.__name__,
        "version": getattr(trt, "__version__", "unknown"),
        "onnx_path": str(onnx_path),
        "engine_path": str(engine_path),
        "engine_bytes": engine_bytes,
        "build_seconds": build_seconds,
        "profiles": [{name: list(shape) for name, shape in p.items()} for p in checked],
        "compute_capabilities": cc_labels,
        "compute_capabilities_source": cc_how,
        "inputs": {n: {"shape": list(i["shape"]), "dtype": i["dtype"]} for n, i in inputs.items()},
        "outputs": {n: {"shape": list(o["shape"]), "dtype": o["dtype"]} for n, o in outputs.items()},
        "strongly_typed": strongly_typed,
        "timing_cache": timing_info,
    }


# ------------------------------------------------------------------------------------------- runtime


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


class _Binding:
    """Persistent device buffers of one (profile, shapes) pair."""

    def __init__(self, profile_index: int, shapes: dict[str, tuple[int, ...]], inputs: dict, outputs: dict):
        self.profile_index = profile_index
        self.shapes = shapes
        self.inputs = inputs
        self.outputs = outputs
        self.tensors = {**inputs, **outputs}
        self.streams: set[int] = set()


class TensorRTEngine:
    """A deserialized engine plus one execution context, with persistent torch buffers per profile.

    ``engine``: path or bytes of a serialized engine.  ``flavor``: "auto" tries every importable library
    (full TensorRT first) until one deserializes it.  ``runtime_cache_path`` (TensorRT-RTX): JIT kernel cache
    loaded now and written back by :meth:`save_runtime_cache` / :meth:`close`.

    Buffers returned by :meth:`infer` are the engine's own persistent outputs: they are overwritten by the
    next :meth:`infer` on the same profile, so clone what you keep.
    """

    def __init__(self, engine: bytes | bytearray | memoryview | str | os.PathLike, *, flavor: str = "auto",
                 device: Any = None, runtime_cache_path: str | os.PathLike | None = None):
        import torch

        if isinstance(engine, (str, os.PathLike)):
            path = Path(engine)
            if not path.is_file():
                raise FileNotFoundError(f"engine file not found: {path}")
            data = path.read_bytes()
            self.source = str(path)
        else:
            data = bytes(engine)
            self.source = f"<{len(data)} bytes>"
        if not torch.cuda.is_available():
            raise TensorRTBackendError("TensorRTEngine needs a CUDA GPU (torch.cuda.is_available() is False)")
        index = None if device is None else torch.device(device).index
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.runtime_cache_path = Path(runtime_cache_path) if runtime_cache_path is not None else None

        candidates = [flavor] if flavor != "auto" else [f for f, (ok, _) in available_flavors().items() if ok]
        if not candidates:
            import_backend("auto")  # raises the descriptive BackendUnavailableError
        failures = []
        with torch.cuda.device(self.device):
            torch.cuda.init()
            for name in candidates:
                fl, trt = import_backend(name)
                try:
                    self._load(fl, trt, data)
                    break
                except TensorRTBackendError as exc:
                    failures.append(f"{fl}: {exc}")
            else:
                raise TensorRTBackendError(f"could not load engine {self.source}:\n  " + "\n  ".join(failures))

        self._bindings: dict[tuple, _Binding] = {}
        self._active: _Binding | None = None
        self._context_key: tuple | None = None
        self._switch_stream = None
        self._last_stream = None

    # -- loading

    def _load(self, flavor: str, trt, data: bytes):
        import torch

        caps = _Caps(trt)
        logger = _get_logger(trt)
        runtime = trt.Runtime(logger)
        if caps.engine_validity:
            # Header-only check (TensorRT-RTX): explains version / compute-capability mismatches up front.
            validity = diagnostics = None
            with contextlib.suppress(Exception):
                header = data[: int(getattr(runtime, "engine_header_size", len(data)))]
                validity, diagnostics = runtime.get_engine_validity(header)
            if getattr(validity, "name", "") == "INVALID":
                reasons = []
                with contextlib.suppress(Exception):
                    enum = trt.EngineInvalidityDiagnostics.__members__
                    reasons = [n for n, m in enum.items() if int(diagnostics) & int(m)]
                gpu = torch.cuda.get_device_name(self.device)
                cc = "%d.%d" % torch.cuda.get_device_capability(self.device)
                hint = ""
                if caps.compute_capability_targets and cc not in _cc_members(trt):
                    hint = f"; {trt.__name__} supports compute capabilities {', '.join(_cc_members(trt))} only"
                raise TensorRTBackendError(
                    f"{trt.__name__} {trt.__version__} says this engine cannot run on this GPU/driver "
                    f"({gpu}, compute capability {cc}): {reasons or diagnostics}{hint}"
                )
        with logger.capture() as logged:
            engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise TensorRTBackendError(f"{trt.__name__}.Runtime.deserialize_cuda_engine failed: " + "; ".join(logged or ["(no details)"]))

        runtime_cache = runtime_config = None
        if caps.engine_runtime_config and caps.runtime_cache and self.runtime_cache_path is not None:
            runtime_config = engine.create_runtime_config()
            runtime_cache = runtime_config.create_runtime_cache()
            if self.runtime_cache_path.is_file():
                if not runtime_cache.deserialize(self.runtime_cache_path.read_bytes()):
                    log.warning("runtime cache %s does not match this GPU/library; starting a fresh one", self.runtime_cache_path)
            runtime_config.set_runtime_cache(runtime_cache)
        with logger.capture() as logged:
            context = engine.create_execution_context(runtime_config) if runtime_config is not None else engine.create_execution_context()
        if context is None:
            raise TensorRTBackendError("create_execution_context failed: " + "; ".join(logged or ["(no details)"]))

        self.flavor, self.trt, self._caps, self._logger = flavor, trt, caps, logger
        self._runtime, self._engine, self._context = runtime, engine, context
        self._runtime_config, self._runtime_cache = runtime_config, runtime_cache
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.dtypes = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.input_names if mode == trt.TensorIOMode.INPUT else self.output_names).append(name)
            self.dtypes[name] = torch_dtype(engine.get_tensor_dtype(name))
        # [(min, max) per input] per profile, read from the engine
        self._profile_ranges: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for p in range(engine.num_optimization_profiles):
            ranges = {}
            for name in self.input_names:
                try:
                    lo, _opt, hi = engine.get_tensor_profile_shape(name, p)
                    ranges[name] = (_dims(lo), _dims(hi))
                except Exception:
                    static = _dims(engine.get_tensor_shape(name))
                    ranges[name] = (static, static)
            self._profile_ranges.append(ranges)

    # -- introspection

    @property
    def num_profiles(self) -> int:
        return len(self._profile_ranges)

    @property
    def profiles(self) -> list[dict[str, tuple[int, ...]]]:
        """Shapes per profile as read from the engine (the max shape where a profile is a range)."""
        return [{n: hi for n, (lo, hi) in r.items()} for r in self._profile_ranges]

    def describe_profiles(self) -> str:
        lines = []
        for i, r in enumerate(self._profile_ranges):
            parts = [f"{n}={list(lo)}" if lo == hi else f"{n}={list(lo)}..{list(hi)}" for n, (lo, hi) in r.items()]
            lines.append(f"  profile {i}: " + ", ".join(parts))
        return "\n".join(lines) or "  (no profiles)"

    def find_profile(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Index of the profile accepting ``shapes`` (a subset of inputs may be given)."""
        unknown = sorted(set(shapes) - set(self.input_names))
        if unknown:
            raise ProfileError(f"{unknown} are not inputs of this engine; inputs: {self.input_names}")
        want = {n: _dims(s) for n, s in shapes.items()}
        matches = []
        for i, ranges in enumerate(self._profile_ranges):
            ok = True
            for name, shape in want.items():
                lo, hi = ranges[name]
                if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                    ok = False
                    break
            if ok:
                matches.append(i)
        if not matches:
            asked = ", ".join(f"{n}={list(s)}" for n, s in want.items())
            raise ProfileError(f"no profile of engine {self.source} accepts {asked}; it was built with:\n{self.describe_profiles()}")
        if len(matches) > 1 and any(self._profile_ranges[m] != self._profile_ranges[matches[0]] for m in matches[1:]):
            exact = [m for m in matches if all(self._profile_ranges[m][n][0] == s for n, s in want.items())]
            if len(exact) != 1:
                raise ProfileError(f"shapes {want} match several profiles {matches}; give more inputs' shapes")
            return exact[0]
        return matches[0]

    # -- binding

    def select(self, profile_shapes: Mapping[str, Sequence[int]]) -> _Binding:
        """Pick the profile matching ``profile_shapes`` and allocate its persistent buffers (once)."""
        import torch

        index = self.find_profile(profile_shapes)
        ranges = self._profile_ranges[index]
        shapes = {}
        for name in self.input_names:
            lo, hi = ranges[name]
            if name in profile_shapes:
                shapes[name] = _dims(profile_shapes[name])
            elif lo == hi:
                shapes[name] = lo
            else:
                raise ProfileError(f"input {name!r} has a range {list(lo)}..{list(hi)} in profile {index}: give its shape")
        key = (index, tuple(shapes[n] for n in self.input_names))
        binding = self._bindings.get(key)
        if binding is None:
            with torch.cuda.device(self.device):
                ins = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device=self.device) for n in self.input_names}
                # Output shapes follow from input shapes: ask the context, set to this profile.  A profile
                # switch is enqueued on the stream of the last infer() (so it follows work in flight there);
                # infer() makes its own stream wait for it.
                stream = self._last_stream or torch.cuda.current_stream(self.device)
                self._apply(index, shapes, stream)
                self._context_key = key
                outs = {}
                for n in self.output_names:
                    shape = _dims(self._context.get_tensor_shape(n))
                    if any(d < 0 for d in shape):
                        raise TensorRTBackendError(f"output {n!r} has unresolved shape {list(shape)} for {shapes}")
                    outs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
            binding = _Binding(index, shapes, ins, outs)
            binding.streams.add(stream.cuda_stream)  # allocation stream
            self._bindings[key] = binding
        self._active = binding
        return binding

    def _apply(self, index: int, shapes: Mapping[str, tuple[int, ...]], stream) -> None:
        ctx = self._context
        if ctx.active_optimization_profile != index:
            if not ctx.set_optimization_profile_async(index, stream.cuda_stream):
                raise TensorRTBackendError(f"set_optimization_profile_async({index}) failed")
            self._switch_stream = stream  # work may be enqueued there; infer() orders its stream after it
        for name in self.input_names:
            if not ctx.set_input_shape(name, shapes[name]):
                raise TensorRTBackendError(f"set_input_shape({name!r}, {list(shapes[name])}) failed in profile {index}")

    @property
    def buffers(self) -> dict[str, Any]:
        """The active profile's persistent tensors (write inputs here to skip the copy in :meth:`infer`)."""
        if self._active is None:
            raise TensorRTBackendError("no profile selected yet: call select() or infer()")
        return dict(self._active.tensors)

    def infer(self, inputs: Mapping[str, Any], stream=None) -> dict[str, Any]:
        """Copy ``inputs`` into the persistent buffers and enqueue the engine on ``stream``; no host sync.

        Returns the persistent output tensors, valid once ``stream`` reaches this point.
        """
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ProfileError(f"missing input(s) {missing}; engine inputs: {self.input_names}")
        if stream is None:
            stream = torch.cuda.current_stream(self.device)
        binding = self._active
        if binding is None or any(tuple(inputs[n].shape) != binding.shapes[n] for n in self.input_names):
            binding = self.select({n: tuple(inputs[n].shape) for n in self.input_names})
        if stream.cuda_stream not in binding.streams:
            # The buffers were allocated on another stream: tell the caching allocator they are used here.
            for t in binding.tensors.values():
                t.record_stream(stream)
            binding.streams.add(stream.cuda_stream)
        with torch.cuda.stream(stream):
            for name, buf in binding.inputs.items():
                src = inputs[name]
                if src.data_ptr() != buf.data_ptr() or src.dtype != buf.dtype:
                    buf.copy_(src, non_blocking=True)
        key = (binding.profile_index, tuple(binding.shapes[n] for n in self.input_names))
        if self._context_key != key:
            self._apply(binding.profile_index, binding.shapes, stream)
            self._context_key = key
        if self._switch_stream is not None:
            if self._switch_stream != stream:
                stream.wait_stream(self._switch_stream)  # GPU-side ordering, no host sync
            self._switch_stream = None
        ctx = self._context
        for name, t in binding.tensors.items():
            ctx.set_tensor_address(name, t.data_ptr())
        self._last_stream = stream
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TensorRTBackendError(f"execute_async_v3 failed for profile {binding.profile_index} {binding.shapes}")
        return dict(binding.outputs)

    # -- caches / teardown

    def save_runtime_cache(self) -> int | None:
        """Write TensorRT-RTX's runtime (JIT kernel) cache to ``runtime_cache_path`` atomically."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        return _atomic_write(self.runtime_cache_path, self._runtime_cache.serialize())

    def close(self) -> None:
        if getattr(self, "_context", None) is None:
            return
        import torch

        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        with contextlib.suppress(Exception):
            self.save_runtime_cache()
        self._bindings.clear()
        self._active = None
        self._context = None
        self._runtime_config = self._runtime_cache = None
        self._engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.source}, flavor={getattr(self, 'flavor', '?')}, profiles={getattr(self, 'num_profiles', '?')})"
