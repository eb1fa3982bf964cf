"""Run a TensorRT (or TensorRT-RTX) engine: one execution context, persistent torch buffers per
optimisation profile, inference enqueued on the caller's stream with no host sync.

    eng = TensorRTEngine("engines/t.plan")
    eng.select({"latents": (1, 16, 128, 128), ...})        # allocates persistent buffers once
    out = eng.infer({"latents": x, ...}, stream)            # enqueues on ``stream``, no host sync
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

    def select(self, profile_shapes: Mapping[str, Sequence[int]]) -> _Binding:
        """Pick the profile matching ``profile_shapes`` and allocate its persistent buffers (once)."""
        import torch

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
                    shape = dims(self._context.get_tensor_shape(n))
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
            checked_call(self._logger, f"set_optimization_profile_async({index})", ctx.set_optimization_profile_async,
                         index, stream.cuda_stream)
            self._switch_stream = stream  # work may be enqueued there; infer() orders its stream after it
        for name in self.input_names:
            checked_call(self._logger, f"set_input_shape({name!r}, {list(shapes[name])}) in profile {index}",
                         ctx.set_input_shape, name, shapes[name])

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
            checked_call(self._logger, f"set_tensor_address({name!r})", ctx.set_tensor_address, name, t.data_ptr())
        self._last_stream = stream
        checked_call(self._logger, f"execute_async_v3 (profile {binding.profile_index} {binding.shapes})",
                     ctx.execute_async_v3, stream.cuda_stream)
        return dict(binding.outputs)

    # -- caches / teardown

    def save_runtime_cache(self) -> int | None:
        """Write TensorRT-RTX's runtime (JIT kernel) cache to ``runtime_cache_path`` atomically."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        return atomic_write_bytes(self.runtime_cache_path, self._runtime_cache.serialize())

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
