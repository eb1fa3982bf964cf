"""The runtime's use of TensorRT's execution context, checked against a recording stand-in (no GPU).

`RecordingExecutionContext` stands in for `IExecutionContext` (and `StandInCudaEngine` for `ICudaEngine`):
they record every call in order, and the tests check the rules NvInferRuntime.h documents: the profile is
set (on a stream) before the input shapes, output shapes are read after every input shape is set, every I/O
tensor is bound, each captured graph has its own context that never switches profile, nothing is created,
set or allocated during capture, and a failed call (an enqueue; an input shape the profile refuses, which
the stand-in refuses as TensorRT does) raises with the message TensorRT logged, leaving nothing half-set. The real
library (TensorRT-RTX, as installed) supplies the enums and the logger; only the GPU-side objects are
stand-ins, because no GPU here executes TensorRT engines.
"""

import pytest
import torch

from zimage_trt.engines import contract
from zimage_trt.engines.base import DenoiserEngine
from zimage_trt.engines.manifest import EngineShape, Manifest
from zimage_trt.engines.tensorrt import runtime as trt_runtime
from zimage_trt.engines.tensorrt.denoiser import TensorRTDenoiserEngine, check_engine_against_manifest
from zimage_trt.engines.tensorrt.library import ProfileError, TensorRTBackendError, get_logger
from zimage_trt.runtime.denoise_loop import DenoiseLoop

from rtx_backend import rtx_or_skip_module

RTX = rtx_or_skip_module()
CAPTION_DIM = 8
HINT_DIM = 4  # the stand-in model's width
DTYPES = {"latents": RTX.float32, "timestep": RTX.float32, "cap_feats": RTX.float16, "cap_lens": RTX.int64,
          "noise_pred": RTX.float32, contract.CONTROLNET_HINTS: RTX.float16}


class FakeStream:
    def __init__(self, handle, log):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other):
        self.log.append(("stream", self.cuda_stream, "wait_stream", other.cuda_stream))


class RecordingExecutionContext:
    """Stands in for IExecutionContext: records calls; answers output shapes only once inputs are set."""

    def __init__(self, index, engine):
        self.index, self.engine, self.log = index, engine, engine.log
        self.shapes, self.addresses = {}, {}
        self.profile = 0

    def _record(self, *call):
        self.log.append(("ctx", self.index, *call))

    def set_optimization_profile_async(self, index, stream):
        self._record("set_optimization_profile_async", index, stream)
        if self.engine.profile_error:
            raise RuntimeError(self.engine.profile_error)  # TensorRT 11's binding raises instead of False
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        """As TensorRT: False (and an error logged) for a shape outside the current profile (these profiles
        are fixed: min = opt = max), or where the test makes TensorRT refuse this input (`shape_error`)."""
        self._record("set_input_shape", name, tuple(shape))
        wanted = tuple(self.engine.profiles[self.profile][name])
        if tuple(shape) != wanted or self.engine.shape_error == name:
            get_logger(RTX).log(RTX.ILogger.Severity.ERROR, (
                f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter check failed, condition: "
                f"satisfyProfile. Set dimension {list(shape)} for tensor {name} does not satisfy any optimization "
                f"profiles. Valid range for profile {self.profile}: {list(wanted)}..{list(wanted)}.)"))
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self._record("get_tensor_shape", name)
        if name == "noise_pred" and set(self.shapes) == set(self.engine.input_names):
            return self.shapes["latents"]
        return (-1, 16, -1, -1)

    def update_device_memory_size_for_shapes(self):
        return 1 << 12

    def set_device_memory(self, address, size):
        self._record("set_device_memory", address, size)

    def set_tensor_address(self, name, address):
        self._record("set_tensor_address", name, address)
        self.addresses[name] = address
        return True

    def is_stream_capturable(self, stream):
        return self.engine.capturable

    def execute_async_v3(self, stream):
        self._record("execute_async_v3", stream)
        if self.engine.enqueue_error:
            get_logger(RTX).log(RTX.ILogger.Severity.ERROR, self.engine.enqueue_error)
            return False
        if self.engine.compute is not None:
            self.engine.compute(self.addresses)
        return True


class RecordingRuntimeConfig:
    def __init__(self, log):
        self.log = log
        self.dynamic_shapes_kernel_specialization_strategy = RTX.DynamicShapesKernelSpecializationStrategy.LAZY

    def set_execution_context_allocation_strategy(self, strategy):
        self.log.append(("config", "allocation", strategy))

    def create_runtime_cache(self):
        return StandInRuntimeCache(self.log)

    def set_runtime_cache(self, cache):
        return True


class StandInRuntimeCache:
    def __init__(self, log):
        self.log = log

    def deserialize(self, data):
        self.log.append(("cache", "deserialize", bytes(data)))
        return True

    def serialize(self):
        return b"kernels compiled for this GPU"


class StandInCudaEngine:
    """Stands in for ICudaEngine: one fixed-shape profile per entry of `profiles` (contract names; with
    `controlnet_hints` in them, the ControlNet-ready variant's inputs)."""

    def __init__(self, profiles, dtypes=DTYPES):
        self.log, self.contexts, self.profiles, self.dtypes = [], [], profiles, dtypes
        self.input_names = list(profiles[0]) if profiles else list(contract.INPUT_NAMES)
        self.names = [*self.input_names, *contract.OUTPUT_NAMES]
        self.capturable, self.enqueue_error, self.profile_error, self.compute = True, None, None, None
        self.shape_error = None  # an input name: set_input_shape refuses it
        self.device_memory_size_v2 = 1 << 12
        self.refittable = False

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return RTX.TensorIOMode.INPUT if name in self.input_names else RTX.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, p):
        shape = self.profiles[p][name]
        return shape, shape, shape

    def create_runtime_config(self):
        return RecordingRuntimeConfig(self.log)

    def create_execution_context(self, config):
        self.log.append(("engine", "create_execution_context", len(self.contexts)))
        context = RecordingExecutionContext(len(self.contexts), self)
        self.contexts.append(context)
        return context


def profile(batch, hw=(32, 32), capacity=32, places=0):
    if places:
        return contract.controlnet_input_shapes(places, batch, hw, capacity, CAPTION_DIM, HINT_DIM)
    return contract.input_shapes(batch, hw, capacity, CAPTION_DIM)


def make(tmp_path, shapes, monkeypatch, places=(), built_places=None, **engine_kw):
    """A TensorRTDenoiserEngine over the stand-in, on the CPU, every call on one fake stream. `places`: the
    manifest's ControlNet places; `built_places`: the network's (default: the same)."""
    built = places if built_places is None else built_places
    cuda_engine = StandInCudaEngine([profile(s.batch, s.size.latent_hw, s.caption_capacity, len(built)) for s in shapes],
                                    **engine_kw)
    wrapper = trt_runtime.TensorRTEngine.from_deserialized(RTX, cuda_engine, flavor="tensorrt-rtx", device="cpu",
                                                           runtime_cache_path=tmp_path / "e.plan.sm89.runtime-cache")
    stream = FakeStream(7, cuda_engine.log)
    monkeypatch.setattr(wrapper, "_current_stream", lambda: stream)
    manifest = Manifest(name="d", component="denoiser", backend="tensorrt-rtx", backend_version=RTX.__version__,
                        precision="fp16", shapes=list(shapes), files=[], compute_capabilities=["8.9"],
                        torch_version=torch.__version__, model={}, controlnet_places=list(places),
                        controlnet_hint_shapes=[list(contract.hint_shape(len(places), s.batch, s.size.latent_hw,
                                                                         s.caption_capacity, HINT_DIM)) for s in shapes] if places else [])
    engine = TensorRTDenoiserEngine(tmp_path / "e.plan", manifest, "cpu", trt_engine=wrapper)
    return engine, wrapper, cuda_engine


def inputs(batch, hw=(32, 32), capacity=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, *hw, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, capacity, CAPTION_DIM, generator=g).half(), torch.full((batch,), 5))


def calls_of(log, index):
    return [c[2:] for c in log if c[0] == "ctx" and c[1] == index]


SHAPES = [EngineShape("256x256", 1, 32), EngineShape("384x256", 1, 32)]  # WIDTHxHEIGHT: 48 latent columns


def test_binding_follows_the_documented_order(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    assert engine.dtype is torch.float16 and not engine.supports_cuda_graph  # CPU: never captured
    assert ("config", "allocation", RTX.ExecutionContextAllocationStrategy.USER_MANAGED) in cuda_engine.log
    assert wrapper._runtime_config.dynamic_shapes_kernel_specialization_strategy == \
        RTX.DynamicShapesKernelSpecializationStrategy.EAGER
    engine.run(*inputs(1), masked=True)
    calls = [c[0] for c in calls_of(cuda_engine.log, 0)]
    n_in = len(contract.INPUT_NAMES)
    assert calls[0] == "set_optimization_profile_async"
    assert calls[1:1 + n_in] == ["set_input_shape"] * n_in
    assert calls[1 + n_in] == "get_tensor_shape"  # output shapes only after every input shape
    assert calls.count("set_device_memory") == 1
    bound = [c[1] for c in calls_of(cuda_engine.log, 0) if c[0] == "set_tensor_address"]
    assert sorted(bound) == sorted([*contract.INPUT_NAMES, *contract.OUTPUT_NAMES])  # every I/O tensor
    assert calls[-1] == "execute_async_v3" and calls.count("execute_async_v3") == 1
    assert calls_of(cuda_engine.log, 0)[0] == ("set_optimization_profile_async", 0, 7)  # on the caller's stream


def test_one_context_per_binding_never_switched(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    small, wide = inputs(1), inputs(1, hw=(32, 48))
    engine.run(*small, masked=True)
    engine.run(*wide, masked=True)
    before = len(cuda_engine.log)
    engine.run(*small, masked=True)
    assert len(cuda_engine.contexts) == 2
    assert cuda_engine.log[before:] == [("ctx", 0, "execute_async_v3", 7)]  # nothing set again, no switch
    for ctx in cuda_engine.contexts:
        profiles = [c[1] for c in calls_of(cuda_engine.log, ctx.index) if c[0] == "set_optimization_profile_async"]
        assert profiles == [ctx.index]  # its own profile, set once
    memory = {c[1:] for c in [c[2:] for c in cuda_engine.log if c[0] == "ctx"] if c[0] == "set_device_memory"}
    assert len(memory) == 1  # one scratch allocation shared by every context


def test_capture_records_only_the_enqueue(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    engine.run(*inputs(1), masked=True)  # the warm-up the denoise loop does before capturing
    allocations = []
    real_empty = wrapper._empty
    monkeypatch.setattr(wrapper, "_empty", lambda *a: allocations.append(a) or real_empty(*a))
    monkeypatch.setattr(trt_runtime, "stream_is_capturing", lambda stream: True)
    before = len(cuda_engine.log)
    engine.run(*inputs(1, seed=1), masked=True)
    assert cuda_engine.log[before:] == [("ctx", 0, "execute_async_v3", 7)] and allocations == []
    assert next(iter(wrapper._bindings.values())).captured
    # A shape that never ran would need a context and buffers mid-capture: refused, nothing created.
    with pytest.raises(TensorRTBackendError, match="during CUDA graph capture"):
        engine.run(*inputs(1, hw=(32, 48)), masked=True)
    assert len(cuda_engine.contexts) == 1 and allocations == []


def test_context_that_is_not_capturable_is_never_captured(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    cuda_engine.capturable = False
    assert not wrapper.stream_capturable(FakeStream(3, cuda_engine.log))  # what gates supports_cuda_graph
    engine.run(*inputs(1), masked=True)
    monkeypatch.setattr(trt_runtime, "stream_is_capturing", lambda stream: True)
    with pytest.raises(TensorRTBackendError, match="is_stream_capturable is False"):
        engine.run(*inputs(1), masked=True)


def test_failed_enqueue_raises_with_tensorrts_message(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    cuda_engine.enqueue_error = "IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (an illegal memory access)"
    with pytest.raises(TensorRTBackendError, match=r"execute_async_v3 .* failed: .*an illegal memory access"):
        engine.run(*inputs(1), masked=True)


def test_a_shape_tensorrt_refuses_is_reported_and_the_engine_stays_usable(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    cuda_engine.shape_error = "cap_feats"
    with pytest.raises(TensorRTBackendError, match=r"set_input_shape\('cap_feats', \[1, 32, 8\]\) in profile 0 failed: "
                                                   r"IExecutionContext::setInputShape: .*does not satisfy"):
        engine.run(*inputs(1), masked=True)
    assert wrapper._bindings == {}  # no half-set binding kept for the next call to find
    cuda_engine.shape_error = None
    engine.run(*inputs(1), masked=True)
    assert len(wrapper._bindings) == 1 and calls_of(cuda_engine.log, 1)[-1][0] == "execute_async_v3"


def test_profile_error_raised_by_tensorrt_11_is_reported(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    cuda_engine.profile_error = "Error in set optimization profile async."
    with pytest.raises(TensorRTBackendError, match=r"set_optimization_profile_async\(0\) failed: RuntimeError: Error in set"):
        engine.run(*inputs(1), masked=True)


def test_close_releases_graphs_before_contexts_and_buffers(tmp_path, monkeypatch, caplog):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    engine.run(*inputs(1), masked=True)
    seen = []
    engine.add_release_hook(lambda: seen.append(all(b.context is not None for b in wrapper._bindings.values())
                                                and wrapper._scratch is not None))
    engine.close()
    assert seen == [True] and wrapper._bindings == {} and wrapper._scratch is None
    # Captured, and no owner released its graphs: said loudly.
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    engine.run(*inputs(1), masked=True)
    monkeypatch.setattr(trt_runtime, "stream_is_capturing", lambda stream: True)
    engine.run(*inputs(1), masked=True)
    with caplog.at_level("WARNING"):
        engine.close()
    assert "captured in CUDA graphs that nobody released" in caplog.text


def test_runtime_cache_is_saved_beside_the_engine_and_loaded_next_time(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    cache = tmp_path / "e.plan.sm89.runtime-cache"
    assert not cache.exists()
    engine.run(*inputs(1), masked=True)  # the first run of a shape compiles: saved right after
    assert cache.read_bytes() == b"kernels compiled for this GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]  # atomic: no temporary left
    _, _, second = make(tmp_path, SHAPES, monkeypatch)
    assert ("cache", "deserialize", b"kernels compiled for this GPU") in second.log


def test_engine_io_is_checked_against_the_contract_and_manifest(tmp_path, monkeypatch):
    with pytest.raises(TensorRTBackendError, match="cap_lens"):
        make(tmp_path, SHAPES, monkeypatch, dtypes={**DTYPES, "cap_lens": RTX.int32})
    engine, wrapper, _ = make(tmp_path, SHAPES, monkeypatch)
    wrong = Manifest(**{**engine.manifest.__dict__, "shapes": [EngineShape("512x512", 1, 32)]})
    with pytest.raises(ProfileError, match="no profile"):
        check_engine_against_manifest(wrapper, wrong)


class SameMathsEngine(DenoiserEngine):
    """The stand-in's maths in plain torch at the exact batch: the reference for the padded runs."""

    kind = "reference"

    def run(self, latents, timestep, cap_feats, cap_lens, masked):
        return stand_in_maths(latents, timestep, cap_feats)


def stand_in_maths(latents, timestep, cap_feats):
    return 0.5 * latents + timestep[:, None, None, None] + cap_feats.float().mean((1, 2))[:, None, None, None]


def test_cfg_truncation_runs_cfg_off_steps_in_the_cfg_profile(tmp_path, monkeypatch):
    """An engine built for the CFG batch 2 only: steps with CFG off (cfg_truncation < 1) ask for batch 1,
    which runs padded in the batch-2 profile and matches the exact-batch computation."""
    engine, wrapper, cuda_engine = make(tmp_path, [EngineShape("256x256", 2, 32)], monkeypatch)

    def compute(addresses):
        tensors = {t.data_ptr(): t for b in wrapper._bindings.values() for t in b.tensors.values()}
        x = {n: tensors[a] for n, a in addresses.items()}
        x["noise_pred"].copy_(stand_in_maths(x["latents"], x["timestep"], x["cap_feats"]))

    cuda_engine.compute = compute
    assert engine.caption_layout([20], "256x256", 1) == (32, True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 32, 32, generator=g)
    pos, neg = [torch.randn(20, CAPTION_DIM, generator=g).half()], [torch.randn(9, CAPTION_DIM, generator=g).half()]
    timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    kw = dict(guidance_scale=4.0, cfg_truncation=0.5, progress=False)
    got = DenoiseLoop(engine, "cpu")(latents, pos, neg, timesteps, sigmas, **kw)
    want = DenoiseLoop(SameMathsEngine("cpu", torch.float16), "cpu")(latents, pos, neg, timesteps, sigmas, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(cuda_engine.contexts) == 1  # every step, CFG on or off, in the one batch-2 binding
    binding = next(iter(wrapper._bindings.values()))
    assert torch.equal(binding.inputs["latents"][1], binding.inputs["latents"][0])  # padded with the last item


# ----------------------------------------------------------------------------- ControlNet-ready variant

PLACES = (1, 0)  # hint order need not follow layer order


def hints_for(batch, hw=(32, 32), capacity=32, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(contract.hint_shape(len(PLACES), batch, hw, capacity, HINT_DIM), generator=g).half()


def computes_with_hints(wrapper, cuda_engine):
    """The stand-in's maths plus, per item, the sum of what the engine reads from its hint buffer, so the
    output shows which hints the enqueue saw."""
    def compute(addresses):
        tensors = {t.data_ptr(): t for b in wrapper._bindings.values() for t in b.tensors.values()}
        x = {n: tensors[a] for n, a in addresses.items()}
        extra = x[contract.CONTROLNET_HINTS].float().sum((0, 2, 3))[:, None, None, None]
        x["noise_pred"].copy_(stand_in_maths(x["latents"], x["timestep"], x["cap_feats"]) + extra)

    cuda_engine.compute = compute


def test_controlnet_ready_engine_binds_its_hint_input_once(tmp_path, monkeypatch):
    """The hint input is set (its contract shape) before the output shape is read and bound like every other
    tensor; the hints of a call land in the persistent buffer the context was given."""
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch, places=PLACES)
    assert engine.takes_controlnet_hints and engine.control_places == PLACES
    computes_with_hints(wrapper, cuda_engine)
    latents, timestep, feats, lens = inputs(1)
    hints = hints_for(1)
    out = engine.run(latents, timestep, feats, lens, masked=True, controlnet_hints=hints)
    calls = calls_of(cuda_engine.log, 0)
    set_shapes = {c[1]: c[2] for c in calls if c[0] == "set_input_shape"}
    assert set_shapes[contract.CONTROLNET_HINTS] == contract.hint_shape(2, 1, (32, 32), 32, HINT_DIM) == (2, 1, 288, 4)
    names = [c[0] for c in calls]
    assert names.index("get_tensor_shape") > max(i for i, c in enumerate(calls) if c[0] == "set_input_shape")
    bound = {c[1]: c[2] for c in calls if c[0] == "set_tensor_address"}
    assert sorted(bound) == sorted([*contract.CONTROLNET_INPUT_NAMES, *contract.OUTPUT_NAMES])
    binding = next(iter(wrapper._bindings.values()))
    buffer = binding.inputs[contract.CONTROLNET_HINTS]
    assert bound[contract.CONTROLNET_HINTS] == buffer.data_ptr() and buffer.dtype is torch.float16
    assert torch.equal(buffer, hints)
    want = stand_in_maths(latents, timestep, feats) + hints.float().sum((0, 2, 3))[:, None, None, None]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_hints_under_capture_record_only_the_enqueue(tmp_path, monkeypatch):
    """A captured step with hints: the copies into the persistent buffers and the enqueue, nothing created,
    set or allocated (the hint buffer keeps the address the context was given)."""
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch, places=PLACES)
    engine.run(*inputs(1), masked=True, controlnet_hints=hints_for(1))  # the warm-up before capture
    binding = next(iter(wrapper._bindings.values()))
    address = binding.inputs[contract.CONTROLNET_HINTS].data_ptr()
    allocations = []
    real_empty = wrapper._empty
    monkeypatch.setattr(wrapper, "_empty", lambda *a: allocations.append(a) or real_empty(*a))
    monkeypatch.setattr(trt_runtime, "stream_is_capturing", lambda stream: True)
    before = len(cuda_engine.log)
    second = hints_for(1, seed=1)
    engine.run(*inputs(1, seed=1), masked=True, controlnet_hints=second)
    assert cuda_engine.log[before:] == [("ctx", 0, "execute_async_v3", 7)] and allocations == []
    assert binding.inputs[contract.CONTROLNET_HINTS].data_ptr() == address
    assert torch.equal(binding.inputs[contract.CONTROLNET_HINTS], second)


def test_hints_of_a_smaller_batch_run_padded_in_the_larger_profile(tmp_path, monkeypatch):
    """Batch 1 in the batch-2 profile: the hints' batch is their second axis, padded with the last item as
    the other inputs are, and the output is the exact-batch computation's."""
    engine, wrapper, cuda_engine = make(tmp_path, [EngineShape("256x256", 2, 32)], monkeypatch, places=PLACES)
    computes_with_hints(wrapper, cuda_engine)
    latents, timestep, feats, lens = inputs(1)
    hints = hints_for(1)
    out = engine.run(latents, timestep, feats, lens, masked=True, controlnet_hints=hints)
    buffer = next(iter(wrapper._bindings.values())).inputs[contract.CONTROLNET_HINTS]
    assert buffer.shape == (2, 2, 288, HINT_DIM)
    assert torch.equal(buffer[:, 0], hints[:, 0]) and torch.equal(buffer[:, 1], hints[:, 0])
    want = stand_in_maths(latents, timestep, feats) + hints.float().sum((0, 2, 3))[:, None, None, None]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_text_to_image_on_a_controlnet_ready_engine_zeroes_its_hints(tmp_path, monkeypatch):
    """No hints after a call with hints: the buffer is zeroed, so the step is the plain model's."""
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch, places=PLACES)
    computes_with_hints(wrapper, cuda_engine)
    engine.run(*inputs(1), masked=True, controlnet_hints=hints_for(1))
    latents, timestep, feats, lens = inputs(1, seed=2)
    out = engine.run(latents, timestep, feats, lens, masked=True)
    assert not next(iter(wrapper._bindings.values())).inputs[contract.CONTROLNET_HINTS].any()
    torch.testing.assert_close(out, stand_in_maths(latents, timestep, feats), rtol=1e-5, atol=1e-5)


def test_plain_engine_asked_for_hints_names_the_build_option(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch)
    assert not engine.takes_controlnet_hints
    with pytest.raises(ValueError, match=r"built without ControlNet inputs.*--controlnet PATH.*"
                                         r"--controlnet-places.*build_engines\(\.\.\., controlnet=\.\.\.\)"):
        engine.run(*inputs(1), masked=True, controlnet_hints=hints_for(1))
    assert cuda_engine.contexts == []  # refused before any binding


def test_hints_of_another_shape_are_refused(tmp_path, monkeypatch):
    engine, wrapper, cuda_engine = make(tmp_path, SHAPES, monkeypatch, places=PLACES)
    wrong = torch.zeros(1, 1, 288, HINT_DIM, dtype=torch.float16)  # one place short
    with pytest.raises(ValueError, match=r"shape \(1, 1, 288, 4\), this engine takes \(2, 1, 288, 4\)"):
        engine.run(*inputs(1), masked=True, controlnet_hints=wrong)


def test_controlnet_variant_is_checked_against_its_manifest(tmp_path, monkeypatch):
    """Manifest and network must agree on the variant, the hints' dtype and every hint shape."""
    with pytest.raises(TensorRTBackendError, match=r"its manifest says ControlNet-ready \(places \[1, 0\]\)"):
        make(tmp_path, SHAPES, monkeypatch, places=PLACES, built_places=())
    with pytest.raises(TensorRTBackendError, match=r"its manifest says plain"):
        make(tmp_path, SHAPES, monkeypatch, places=(), built_places=PLACES)
    with pytest.raises(TensorRTBackendError, match=contract.CONTROLNET_HINTS):
        make(tmp_path, SHAPES, monkeypatch, places=PLACES, dtypes={**DTYPES, contract.CONTROLNET_HINTS: RTX.float32})
    engine, wrapper, _ = make(tmp_path, SHAPES, monkeypatch, places=PLACES)
    other_dim = [[*s[:-1], HINT_DIM * 2] for s in engine.manifest.controlnet_hint_shapes]
    wrong = Manifest(**{**engine.manifest.__dict__, "controlnet_hint_shapes": other_dim})
    with pytest.raises(ProfileError, match="no profile"):
        check_engine_against_manifest(wrapper, wrong)


def test_an_engine_that_fails_its_manifest_check_is_closed_when_we_opened_it(tmp_path, monkeypatch):
    """Opened from its path and refused by the check: closed (its GPU memory and contexts given back);
    an engine the caller handed in is the caller's to close."""
    from zimage_trt.engines.tensorrt import denoiser as trt_denoiser

    _, wrapper, _ = make(tmp_path, SHAPES, monkeypatch)
    closed = []
    monkeypatch.setattr(wrapper, "close", lambda: closed.append(True))
    monkeypatch.setattr(trt_denoiser, "TensorRTEngine", lambda *args, **kwargs: wrapper)
    wrong = Manifest(name="d", component="denoiser", backend="tensorrt-rtx", backend_version=RTX.__version__,
                     precision="fp16", shapes=[EngineShape("512x512", 1, 32)], files=[], compute_capabilities=["8.9"],
                     torch_version=torch.__version__, model={})
    with pytest.raises(ProfileError, match="no profile"):
        TensorRTDenoiserEngine(tmp_path / "e.plan", wrong, "cpu")
    assert closed == [True]
    with pytest.raises(ProfileError, match="no profile"):
        TensorRTDenoiserEngine(tmp_path / "e.plan", wrong, "cpu", trt_engine=wrapper)
    assert closed == [True], "not ours to close"
