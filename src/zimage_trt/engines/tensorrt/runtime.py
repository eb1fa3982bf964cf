"""Run a TensorRT (or TensorRT-RTX) engine: one execution context per (profile, shapes) binding, persistent
torch buffers bound once, inference enqueued on the caller's stream with no host sync.

    eng = TensorRTEngine("engines/t.plan")
    eng.select({"latents": (1, 16, 128, 128), ...})        # context, buffers and addresses, once
    out = eng.infer({"latents": x, ...}, stream)            # enqueues on ``stream``, no host sync

Why one context per binding (NvInferRuntime.h, IExecutionContext): a profile switch "will trigger layer
resource updates on the next enqueueV3()", and so does a new tensor address; a CUDA graph captured on
profile A and replayed after the context moved to profile B would replay stale state. So each binding gets
its own context whose profile, input shapes and tensor addresses are set once, before any capture, and
never again. The contexts share one user-managed scratch allocation (the engine's largest need): they
run one at a time, since every enqueue is ordered after the previous one (see :meth:`TensorRTEngine.infer`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write_bytes
from .library import (
    Caps,
    ProfileError,
    TensorRTBackendError,
    available_flavors,
    compute_capability_members,
    dims,
    get_logger,
    import_backend,
    log,
    torch_dtype,
)


def stream_is_capturing(stream) -> bool:
    """Whether CUDA graph capture is under way on the current stream (``stream`` is the one we enqueue on)."""
    import torch

    return bool(getattr(stream, "device", None) is not None and stream.device.type == "cuda"
                and torch.cuda.is_current_stream_capturing())


def checked_call(logger, what: str, fn: Callable, *args):
    """Call one TensorRT API inside the logger capture. TensorRT reports failure as False/None (TensorRT
    10, TensorRT-RTX) or as a raised RuntimeError (TensorRT 11 for some calls); either way the error
    raised here carries what TensorRT logged."""
    with logger.capture() as logged:
        try:
            result = fn(*args)
        except Exception as exc:  # the bindings raise RuntimeError; keep TensorRT's own words
            logged.append(f"{type(exc).__name__}: {exc}")
            result = False
    if result is False or result is None:
        raise TensorRTBackendError(f"{what} failed: " + ("; ".join(logged) or "(TensorRT logged no reason)"))
    return result


class _Binding:
    """One (profile, input shapes) pair: its own execution context and persistent device buffers."""

    def __init__(self, profile_index: int, shapes: dict[str, tuple[int, ...]], context, inputs: dict, outputs: dict,
                 setup_stream):
        self.profile_index = profile_index
        self.shapes = shapes
        self.context = context
        self.inputs = inputs
        self.outputs = outputs
        self.tensors = {**inputs, **outputs}
        self.setup_stream = setup_stream  # the profile was set there: the first enqueue must follow it
        self.streams: set[int] = set()
        self.warmed = False  # enqueued once (TensorRT-RTX compiles its kernels on the first run)
        self.capturable = True
        self.captured = False


class TensorRTEngine:
    """A deserialized engine with one execution context and persistent torch buffers per profile.

    ``engine``: path or bytes of a serialized engine.  ``flavor``: "auto" tries every importable library
    (full TensorRT first) until one deserializes it.  ``runtime_cache_path`` (TensorRT-RTX): JIT kernel cache
    loaded now and written back (atomically) after each new shape's first run and by :meth:`close`, so a
    second process skips the JIT.

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
            source = str(path)
        else:
            data = bytes(engine)
            source = f"<{len(data)} bytes>"
        if not torch.cuda.is_available():
            raise TensorRTBackendError("TensorRTEngine needs a CUDA GPU (torch.cuda.is_available() is False)")
        index = None if device is None else torch.device(device).index
        self._init_state(torch.device("cuda", torch.cuda.current_device() if index is None else index),
                         runtime_cache_path, source)

        candidates = [flavor] if flavor != "auto" else [f for f, (ok, _) in available_flavors().items() if ok]
        if not candidates:
            import_backend("auto")  # raises the descriptive BackendUnavailableError
        failures = []
        with torch.cuda.device(self.device):
            torch.cuda.init()
            for name in candidates:
                fl, trt = import_backend(name)
                try:
                    runtime, engine_obj = self._deserialize(trt, data)
                    self._adopt(fl, trt, runtime, engine_obj)
                    break
                except TensorRTBackendError as exc:
                    failures.append(f"{fl}: {exc}")
            else:
                raise TensorRTBackendError(f"could not load engine {source}:\n  " + "\n  ".join(failures))

    @classmethod
    def from_deserialized(cls, trt, engine, *, flavor: str, device: Any, runtime=None,
                          runtime_cache_path: str | os.PathLike | None = None, source: str = "<deserialized engine>"):
        """Wrap an ``ICudaEngine`` deserialized elsewhere (``trt`` is its module). Nothing here needs a GPU
        until a binding is made, which is what lets the glue be tested against stand-ins."""
        import torch

        self = cls.__new__(cls)
        self._init_state(torch.device(device), runtime_cache_path, source)
        self._adopt(flavor, trt, runtime, engine)
        return self

    def _init_state(self, device, runtime_cache_path, source: str) -> None:
        self.device = device
        self.source = source
        self.runtime_cache_path = Path(runtime_cache_path) if runtime_cache_path is not None else None
        self._bindings: dict[tuple, _Binding] = {}
        self._active: _Binding | None = None
        self._last_stream = None
        self._scratch = None
        self._release_hooks: list[Callable[[], Any]] = []
        self._cache_write_failed = False
        self._engine = None

    # -- loading

    def _deserialize(self, trt, data: bytes):
        import torch

        caps = Caps(trt)
        logger = get_logger(trt)
        runtime = trt.Runtime(logger)
        if caps.engine_validity:
            # Header-only check (TensorRT-RTX): explains version / compute-capability mismatches up front.
            header = data[: int(getattr(runtime, "engine_header_size", len(data)))]
            with logger.capture() as logged:
                try:
                    validity, diagnostics = runtime.get_engine_validity(header)
                except Exception as exc:
                    validity, diagnostics = None, None
                    logged.append(f"{type(exc).__name__}: {exc}")
            if getattr(validity, "name", "") == "INVALID":
                gpu = torch.cuda.get_device_name(self.device)
                cc = "%d.%d" % torch.cuda.get_device_capability(self.device)
                hint = ""
                if caps.compute_capability_targets and cc not in compute_capability_members(trt):
                    hint = f"; {trt.__name__} supports compute capabilities {', '.join(compute_capability_members(trt))} only"
                raise TensorRTBackendError(
                    f"{trt.__name__} {trt.__version__} says this engine cannot run on this GPU/driver "
                    f"({gpu}, compute capability {cc}): {describe_invalidity(trt, diagnostics, logged)}{hint}"
                )
        with logger.capture() as logged:
            engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise TensorRTBackendError(f"{trt.__name__}.Runtime.deserialize_cuda_engine failed: " + "; ".join(logged or ["(no details)"]))
        return runtime, engine

    def _adopt(self, flavor: str, trt, runtime, engine) -> None:
        caps = Caps(trt)
        self.flavor, self.trt, self._caps, self._logger = flavor, trt, caps, get_logger(trt)
        self._runtime, self._engine = runtime, engine
        self._runtime_config = self._runtime_cache = None
        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if caps.engine_runtime_config:
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(user_managed)
            if hasattr(config, "dynamic_shapes_kernel_specialization_strategy"):
                # TensorRT-RTX: compile the shape-specialised kernels at the first run, blocking, instead of
                # running fallback kernels until a background JIT finishes: a graph captured after one
                # warm-up must hold the final kernels.
                config.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            if caps.runtime_cache and self.runtime_cache_path is not None:
                cache = config.create_runtime_cache()
                if self.runtime_cache_path.is_file():
                    if not cache.deserialize(self.runtime_cache_path.read_bytes()):
                        log.warning("runtime cache %s does not match this GPU/library; starting a fresh one", self.runtime_cache_path)
                if not config.set_runtime_cache(cache):
                    log.warning("%s refused its runtime cache; kernels will be compiled in every process", trt.__name__)
                else:
                    self._runtime_cache = cache
            self._runtime_config = config
        self._allocation_strategy = user_managed
        self.refittable = bool(getattr(engine, "refittable", False))
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
                    ranges[name] = (dims(lo), dims(hi))
                except Exception:
                    static = dims(engine.get_tensor_shape(name))
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
        want = {n: dims(s) for n, s in shapes.items()}
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

    def _empty(self, shape, dtype):
        import torch

        return torch.empty(shape, dtype=dtype, device=self.device)

    def _current_stream(self):
        import torch

        return torch.cuda.current_stream(self.device)

    def _new_context(self):
        """An execution context whose device memory we supply (no allocation of its own)."""
        engine = self._engine
        if self._runtime_config is not None:
            return checked_call(self._logger, "create_execution_context(runtime_config)", engine.create_execution_context,
                                self._runtime_config)
        return checked_call(self._logger, "create_execution_context(USER_MANAGED)", engine.create_execution_context,
                            self._allocation_strategy)

    def _scratch_for(self, context):
        """The scratch memory every context shares, sized for the engine's largest profile; (address, size)."""
        import torch

        need = int(getattr(self._engine, "device_memory_size_v2", None) or getattr(self._engine, "device_memory_size", 0))
        with contextlib.suppress(AttributeError):
            need = max(need, int(context.update_device_memory_size_for_shapes()))
        if self._scratch is None:
            self._scratch = self._empty((max(need, 1),), torch.uint8)  # torch's CUDA blocks are 512-byte aligned
        elif self._scratch.numel() < need:
            raise TensorRTBackendError(
                f"profile needs {need} bytes of scratch memory but the engine reported at most {self._scratch.numel()}")
        return self._scratch.data_ptr(), self._scratch.numel()

    def select(self, profile_shapes: Mapping[str, Sequence[int]], stream=None) -> _Binding:
        """Pick the profile matching ``profile_shapes``; on first use make its binding: a context with the
        profile set (on ``stream``) then the input shapes, output buffers sized from the context, scratch
        memory and every tensor address set once."""
        index = self.find_profile(profile_shapes)
        ranges = self._profile_ranges[index]
        shapes = {}
        for name in self.input_names:
            lo, hi = ranges[name]
            if name in profile_shapes:
                shapes[name] = dims(profile_shapes[name])
            elif lo == hi:
                shapes[name] = lo
            else:
                raise ProfileError(f"input {name!r} has a range {list(lo)}..{list(hi)} in profile {index}: give its shape")
        key = (index, tuple(shapes[n] for n in self.input_names))
        binding = self._bindings.get(key)
        if binding is None:
            stream = stream or self._last_stream or self._current_stream()
            if stream_is_capturing(stream):
                raise TensorRTBackendError(
                    f"first use of profile {index} {shapes} during CUDA graph capture: a new binding creates an "
                    "execution context and allocates; run this shape once before capturing it")
            binding = self._make_binding(index, shapes, stream)
            self._bindings[key] = binding
        self._active = binding
        return binding

    def _make_binding(self, index: int, shapes, stream) -> _Binding:
        logger = self._logger
        ctx = self._new_context()
        # Order from NvInferRuntime.h: the profile first (async, on the stream the first enqueue follows),
        # then every input shape, and only then are output shapes known.
        checked_call(logger, f"set_optimization_profile_async({index})", ctx.set_optimization_profile_async,
                     index, stream.cuda_stream)
        for name in self.input_names:
            checked_call(logger, f"set_input_shape({name!r}, {list(shapes[name])}) in profile {index}",
                         ctx.set_input_shape, name, shapes[name])
        ins = {n: self._empty(shapes[n], self.dtypes[n]) for n in self.input_names}
        outs = {}
        for n in self.output_names:
            shape = dims(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise TensorRTBackendError(f"output {n!r} has unresolved shape {list(shape)} for {shapes}")
            outs[n] = self._empty(shape, self.dtypes[n])
        address, size = self._scratch_for(ctx)
        if hasattr(ctx, "set_device_memory"):
            checked_call(logger, "set_device_memory", lambda: ctx.set_device_memory(address, size) or True)
        else:  # TensorRT 10.0
            ctx.device_memory = address
        binding = _Binding(index, shapes, ctx, ins, outs, stream)
        for name, tensor in binding.tensors.items():  # bound once: an address change also re-triggers setup
            checked_call(logger, f"set_tensor_address({name!r})", ctx.set_tensor_address, name, tensor.data_ptr())
        binding.streams.add(stream.cuda_stream)  # allocation stream
        return binding

    @property
    def buffers(self) -> dict[str, Any]:
        """The active profile's persistent tensors (write inputs here to skip the copy in :meth:`infer`)."""
        if self._active is None:
            raise TensorRTBackendError("no profile selected yet: call select() or infer()")
        return dict(self._active.tensors)

    def stream_capturable(self, stream) -> bool:
        """Whether an enqueue on ``stream`` may be captured in a CUDA graph. TensorRT-RTX answers per context
        (``is_stream_capturable``: it is not when the engine allocates at run time); full TensorRT has no such
        query and its enqueueV3 is capturable after one warm-up run. Asked of a context on profile 0."""
        binding = next(iter(self._bindings.values()), None)
        if binding is not None:
            ctx = binding.context
        elif hasattr(self.trt.IExecutionContext, "is_stream_capturable"):
            ctx = self._new_context()
            checked_call(self._logger, "set_optimization_profile_async(0)", ctx.set_optimization_profile_async,
                         0, stream.cuda_stream)
            for name, (_lo, hi) in self._profile_ranges[0].items():
                checked_call(self._logger, f"set_input_shape({name!r})", ctx.set_input_shape, name, hi)
            address, size = self._scratch_for(ctx)  # as a binding's context would be, memory included
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(address, size)
        else:
            return True
        query = getattr(ctx, "is_stream_capturable", None)
        return True if query is None else bool(query(stream.cuda_stream))

    def infer(self, inputs: Mapping[str, Any], stream=None) -> dict[str, Any]:
        """Copy ``inputs`` into the persistent buffers and enqueue the engine on ``stream``; no host sync.

        Returns the persistent output tensors, valid once ``stream`` reaches this point. Under CUDA graph
        capture only the copies and the enqueue are recorded: no context, profile switch, shape, address or
        allocation (the shape must have run once before).
        """
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ProfileError(f"missing input(s) {missing}; engine inputs: {self.input_names}")
        if stream is None:
            stream = self._current_stream()
        binding = self._active
        if binding is None or any(tuple(inputs[n].shape) != binding.shapes[n] for n in self.input_names):
            binding = self.select({n: tuple(inputs[n].shape) for n in self.input_names}, stream)
        capturing = stream_is_capturing(stream)
        if capturing:
            if not binding.warmed:
                raise TensorRTBackendError(
                    f"profile {binding.profile_index} {binding.shapes} is captured before it ever ran: run it once "
                    "first (its first run compiles and allocates)")
            if not binding.capturable:
                raise TensorRTBackendError(
                    f"{self.trt.__name__} says this context cannot be captured on this stream "
                    "(is_stream_capturable is False); run without CUDA graphs (use_cuda_graph=False)")
            binding.captured = True
        else:
            # Shared scratch memory and the profile set-up: GPU-side ordering after the previous enqueue.
            for before in (self._last_stream, binding.setup_stream):
                if before is not None and before.cuda_stream != stream.cuda_stream:
                    stream.wait_stream(before)
            binding.setup_stream = None
            if stream.cuda_stream not in binding.streams:
                if self.device.type == "cuda":  # buffers made on another stream are used here too
                    for t in binding.tensors.values():
                        t.record_stream(stream)
                binding.streams.add(stream.cuda_stream)
        with (torch.cuda.stream(stream) if self.device.type == "cuda" else contextlib.nullcontext()):
            for name, buf in binding.inputs.items():
                src = inputs[name]
                if src.data_ptr() != buf.data_ptr() or src.dtype != buf.dtype:
                    buf.copy_(src, non_blocking=True)
        checked_call(self._logger, f"execute_async_v3 (profile {binding.profile_index} {binding.shapes})",
                     binding.context.execute_async_v3, stream.cuda_stream)
        self._last_stream = stream
        if not binding.warmed:
            binding.warmed = True
            query = getattr(binding.context, "is_stream_capturable", None)
            binding.capturable = True if query is None else bool(query(stream.cuda_stream))
            self._save_runtime_cache_quietly()  # this shape's kernels are compiled now
        return dict(binding.outputs)

    # -- caches / teardown

    def save_runtime_cache(self) -> int | None:
        """Write TensorRT-RTX's runtime (JIT kernel) cache to ``runtime_cache_path`` atomically."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        return atomic_write_bytes(self.runtime_cache_path, self._runtime_cache.serialize())

    def _save_runtime_cache_quietly(self) -> None:
        if self._cache_write_failed:
            return
        try:
            self.save_runtime_cache()
        except OSError as exc:  # e.g. a read-only engine folder: run on, compiling again next time
            self._cache_write_failed = True
            log.warning("cannot write the runtime cache %s (%s); the next process will compile its kernels again",
                        self.runtime_cache_path, exc)

    def add_release_hook(self, release: Callable[[], Any]) -> None:
        """``release()`` drops the CUDA graphs captured over this engine; :meth:`close` calls it first."""
        self._release_hooks.append(release)

    def release_graphs(self) -> bool:
        """Run the release hooks (the graph owners drop what they captured over this engine); False if none
        is registered. After a refit too: whether TensorRT keeps weight addresses is not documented."""
        for release in self._release_hooks:
            release()
        if self._release_hooks:
            for binding in self._bindings.values():
                binding.captured = False
        return bool(self._release_hooks)

    def close(self) -> None:
        """Graphs first (their owners' release hooks), then the contexts, then the buffers they point to."""
        if self._engine is None:
            return
        hooks = self.release_graphs()
        self._release_hooks = []
        captured = [b for b in self._bindings.values() if b.captured]
        if captured and not hooks:
            log.warning("closing %s: %d binding(s) were captured in CUDA graphs that nobody released "
                        "(add_release_hook); replaying those graphs now would touch freed memory",
                        self.source, len(captured))
        if self.device.type == "cuda":
            import torch

            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        self._save_runtime_cache_quietly()
        for binding in self._bindings.values():
            binding.context = None  # contexts before the memory they were given
        self._bindings.clear()
        self._active = None
        self._scratch = None
        self._runtime_config = self._runtime_cache = None
        self._engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.source}, flavor={getattr(self, 'flavor', '?')}, profiles={getattr(self, 'num_profiles', '?')})"


def describe_invalidity(trt, diagnostics, logged: Sequence[str]) -> str:
    """TensorRT-RTX's ``get_engine_validity`` diagnostics as words. Its flags can be 0 (e.g. when no CUDA
    driver answers), so what TensorRT logged meanwhile is added: that is where the reason is."""
    reasons = []
    with contextlib.suppress(Exception):
        reasons = [n for n, m in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(m)]
    text = ", ".join(reasons) if reasons else "no diagnostic flag set"
    if logged:
        text += "; TensorRT logged: " + "; ".join(logged)
    return text
