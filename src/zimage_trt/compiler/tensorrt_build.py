"""Build a TensorRT (or TensorRT-RTX) engine from ONNX: fixed-shape optimisation profiles, strong typing,
a progress bar and cancellation (Ctrl-C or an event), the timing cache where the library has one, and
a whole-or-nothing engine file.

    info = build_tensorrt_engine("transformer.onnx", "engines/t.plan",
                                 [{"latents": (1, 16, 128, 128), ...}, {"latents": (1, 16, 96, 160), ...}],
                                 flavor="tensorrt-rtx", compute_capabilities=["8.9", "12.0"])

How the two libraries differ, and how we tell: `engines/tensorrt/library.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engines.tensorrt.library import (
    BuildCancelledError,
    Caps,
    EngineBuildError,
    ProfileError,
    TensorRTBackendError,
    current_gpu_compute_capability,
    dims,
    get_logger,
    import_backend,
    log,
    parse_compute_capability,
    resolve_rtx_targets,
)
from ..files import atomic_write_bytes

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


# ------------------------------------------------------------------------------------------- building


def _parse_onnx(trt, builder, logger, onnx_path: Path, caps: Caps):
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
        inputs[t.name] = {"shape": dims(t.shape), "dtype": t.dtype.name, "shape_tensor": bool(getattr(t, "is_shape_tensor", False))}
    outputs = {}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs[t.name] = {"shape": dims(t.shape), "dtype": t.dtype.name}
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
                shape = dims(profile[name])
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
    refittable: bool = False,
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

    ``refittable``: set ``BuilderFlag.REFIT`` so any weight can take new values later through ``trt.Refitter``
    (LoRA without a rebuild). It costs a larger plan and may rule out weight-specialised kernels.

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
    caps = Caps(trt)
    logger = get_logger(trt)

    # Targets first: cheap argument errors before any heavy work.
    cc_labels: list[str]
    cc_members: list[Any] = []
    cc_how: str
    if caps.compute_capability_targets:
        cc_labels, cc_members, cc_how = resolve_rtx_targets(trt, compute_capabilities)
    else:
        current = current_gpu_compute_capability()
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
    flags = []
    if hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        # TensorRT-RTX: no run-time allocation inside enqueue, which is what makes it capturable in a CUDA
        # graph (the build fails instead if the network needs data-dependent allocation).
        flags.append("REQUIRE_USER_ALLOCATION")
    if refittable:
        flags.append("REFIT")  # any weight may change (REFIT_IDENTICAL would promise the same values)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
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
        hint = ""
        if refittable and caps.compute_capability_targets and (current_gpu_compute_capability() is None or len(cc_labels) > 1):
            # Seen with TensorRT-RTX 1.7.1: its graph compiler calls CUDA for refittable weights (no driver:
            # "graph_jit ... CUDA_SUCCESS"), and refuses several targets at once ("sm_vers_.size() == 1").
            hint = (f"\n{trt.__name__} {trt.__version__} builds refittable engines only on a machine with a CUDA GPU "
                    "and driver, for one compute capability at a time: build there, with one --compute-capability")
        raise EngineBuildError(
            f"{trt.__name__} failed to build an engine from {onnx_path}:\n  " + "\n  ".join(logged or ["(no details logged)"])
            + hint
        )

    engine_bytes = atomic_write_bytes(engine_path, serialized)
    del serialized

    if timing_info["used"]:
        with contextlib.suppress(Exception):
            data = config.get_timing_cache().serialize()
            timing_info["saved_bytes"] = atomic_write_bytes(timing_path, data)

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
        "builder_flags": flags,
        "refittable": bool(refittable),
    }
