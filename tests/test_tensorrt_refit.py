"""Refit (LoRA without a rebuild) for TensorRT engines: the build-time name map and the refit path, against a
recording stand-in for `trt.Refitter` that refuses what the real one refuses (an unknown name, another
dtype or size, weights it needs together, a failed refit) with an error logged as TensorRT logs it.

Why a stand-in, and not the names a real refittable engine reports: on this machine TensorRT-RTX 1.7.1
cannot build one and could not open one. `test_the_library_cannot_build_or_open_a_refittable_engine_here`
checks both, quoting the library: every refit flavour fails at build time with "MyelinCheckException:
graph_jit.cpp:278: CHECK(status == CUDA_SUCCESS) failed. In compileGraph" (its compiler calls CUDA for
refittable weights; the same network builds without the flag), and deserialising any engine fails with
"cudaError 35: CUDA driver version is insufficient for CUDA runtime version" (a Refitter takes an
ICudaEngine). The closest the CPU gets: the slow build test checks the map of a real build against the
weights TensorRT-RTX's own parser holds (names, dtypes, sizes of the network's constant layers); the gpu
test refits a real engine (an RTX-class GPU: TensorRT-RTX refuses the H100/H200's compute capability 9.0)."""

import ctypes
import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from zimage_trt.cli import main as cli_main
from zimage_trt.compiler.build import build_engines
from zimage_trt.engines.manifest import EngineShape, Manifest, ManifestError
from zimage_trt.engines.tensorrt import refit
from zimage_trt.engines.tensorrt.denoiser import TensorRTDenoiserEngine
from zimage_trt.engines.tensorrt.library import get_logger
from zimage_trt.testing.tiny import make_tiny_components

from rtx_backend import rtx_or_skip_module

RTX = rtx_or_skip_module()
TRT_DTYPE = {torch.float16: RTX.float16, torch.float32: RTX.float32, torch.bfloat16: RTX.bfloat16}


def _init(name, tensor):
    """An initializer as torch's exporter writes it: raw little-endian bytes."""
    onnx_type = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT,
                 torch.bfloat16: TensorProto.BFLOAT16}[tensor.dtype]
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, onnx_type, list(tensor.shape), raw, raw=True)


@pytest.fixture
def exported(tmp_path):
    """A graph shaped like our export: a pre-transposed projection under a generated name, a bias under its
    own, and an all-ones norm weight (constant-valued), in bf16 and fp16."""
    g = torch.Generator().manual_seed(0)
    weights = {"lin.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
               "lin.bias": torch.randn(6, generator=g).half(), "norm.weight": torch.ones(4).half()}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], initializer=[
        _init("val_12", weights["lin.weight"].t()), _init("lin.bias", weights["lin.bias"]),
        _init("val_3", weights["norm.weight"])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path, weights


def test_map_finds_renamed_and_transposed_weights_by_value(exported):
    path, weights = exported
    found = refit.map_initializers(path, weights)
    assert found == {"val_12": [["lin.weight"], "T"], "lin.bias": [["lin.bias"], ""]}
    assert refit.unmapped_weights(found, weights) == ["norm.weight"]  # constant-valued: never refitted


def test_map_reads_weights_from_external_data(exported, tmp_path):
    """Past 2 GB our export puts the weights in NAME.onnx.data: they are read from there, tensor by tensor."""
    path, weights = exported
    big = tmp_path / "big" / "m.onnx"
    big.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(big), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert (big.parent / "m.onnx.data").is_file()
    assert refit.map_initializers(big, weights) == refit.map_initializers(path, weights)


def manifest(**kw):
    fields = dict(name="d", component="denoiser", backend="tensorrt-rtx", backend_version=RTX.__version__,
                  precision="fp16", shapes=[EngineShape("256x256", 1, 32)], files=[], compute_capabilities=["8.9"],
                  torch_version=torch.__version__, model={}, refittable=True,
                  refit_weights={"val_12": [["lin.weight"], "T"], "lin.bias": [["lin.bias"], ""],
                                 "val_7": [["a.weight", "b.weight"], ""]})
    fields.update(kw)
    return Manifest(**fields)


class RecordingRefitter:
    """Stands in for trt.Refitter: the engine's weights with prototypes; records the bytes set. Failing modes,
    each logged as TensorRT logs it: `refuse` (names whose values it rejects), values of another dtype or
    size than the prototype, `missing` (weights it needs set too), `refit_error` (refit_cuda_engine fails)."""

    def __init__(self, prototypes, missing=(), refuse=(), refit_error=None):
        self.prototypes, self.missing, self.refuse = prototypes, list(missing), set(refuse)
        self.refit_error = refit_error
        self.set, self.refitted = {}, 0

    def get_all_weights(self):
        return list(self.prototypes)

    def get_weights_prototype(self, name):
        dtype, count = self.prototypes[name]
        return RTX.Weights(TRT_DTYPE[dtype], 0, count)  # (a prototype: dtype and size only)

    def set_named_weights(self, name, weights, location):
        dtype, count = self.prototypes[name]
        if name in self.refuse or weights.dtype != TRT_DTYPE[dtype] or weights.size != count:
            get_logger(TRT).log(RTX.ILogger.Severity.ERROR, f"IRefitter::setNamedWeights: Error Code 3: API Usage "
                                f"Error (weights {name} rejected: {weights.size} values of {weights.dtype}, the engine "
                                f"holds {count} of {TRT_DTYPE[dtype]})")
            return False
        assert location == RTX.TensorLocation.HOST
        self.set[name] = (weights.dtype, weights.size, weights.data)
        return True

    def get_missing_weights(self):
        return self.missing

    def refit_cuda_engine(self):
        if self.refit_error:
            get_logger(TRT).log(RTX.ILogger.Severity.ERROR, self.refit_error)
            return False
        self.refitted += 1
        return True


class RecordedWeights:
    """What trt.Weights(dtype, pointer, count) is given, with the bytes at the pointer read at once."""

    def __init__(self, dtype, pointer, count):
        self.dtype, self.size = dtype, count
        self.data = ctypes.string_at(pointer, count * (4 if dtype == RTX.float32 else 2))


class RecordingTrt:
    """The TensorRT-RTX module, but trt.Weights records the host bytes it points at."""

    Weights = RecordedWeights

    def __getattr__(self, name):
        return getattr(RTX, name)


TRT = RecordingTrt()


class Engine:
    refittable, trt, device, _engine = True, TRT, torch.device("cpu"), None


def test_refit_sets_engine_names_in_the_engine_layout_and_dtype():
    g = torch.Generator().manual_seed(1)
    new_w, new_b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    refitter = RecordingRefitter({"val_12": (torch.bfloat16, 24), "lin.bias": (torch.float16, 6), "val_7": (torch.float16, 4)})
    names = refit.refit_engine(Engine(), manifest(), {"lin.weight": new_w, "lin.bias": new_b}, refitter=refitter)
    assert names == ["lin.bias", "val_12"] and refitter.refitted == 1
    dtype, size, data = refitter.set["val_12"]
    assert dtype == RTX.bfloat16 and size == 24
    assert data == new_w.t().to(torch.bfloat16).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert refitter.set["lin.bias"][2] == new_b.half().numpy().tobytes()


@pytest.mark.parametrize("kw, weights, message", [
    ({"refittable": False}, {"lin.bias": torch.zeros(6)}, "not built refittable; rebuild it with `zimage-trt build --refittable`"),
    ({"precision": "fp8"}, {"lin.bias": torch.zeros(6)}, "FP8 TensorRT engines cannot be refitted"),
    ({}, {"layers.0.attention.to_q.weight": torch.zeros(2)}, "not refittable in engine d"),
    ({}, {"a.weight": torch.ones(4)}, r"shares engine weight val_7 with \['b.weight'\]"),
    ({}, {"a.weight": torch.ones(4), "b.weight": torch.zeros(4)}, "cannot take different values"),
])
def test_refit_refusals_say_what_and_how(kw, weights, message):
    refitter = RecordingRefitter({"val_12": (torch.bfloat16, 24), "lin.bias": (torch.float16, 6), "val_7": (torch.float16, 4)})
    with pytest.raises(refit.RefitError, match=message):
        refit.refit_engine(Engine(), manifest(**kw), weights, refitter=refitter)
    assert refitter.refitted == 0 and refitter.set == {}


def test_refit_reports_tensorrts_refusal_and_missing_weights():
    protos = {"val_12": (torch.bfloat16, 24), "lin.bias": (torch.float16, 6), "val_7": (torch.float16, 4)}
    with pytest.raises(refit.RefitError, match="weights lin.bias rejected"):
        refit.refit_engine(Engine(), manifest(), {"lin.bias": torch.zeros(6)},
                           refitter=RecordingRefitter(protos, refuse={"lin.bias"}))
    with pytest.raises(refit.RefitError, match=r"refitted together .*val_12"):
        refit.refit_engine(Engine(), manifest(), {"lin.bias": torch.zeros(6)},
                           refitter=RecordingRefitter(protos, missing=["val_12"]))
    with pytest.raises(refit.RefitError, match="6 values given, the engine holds 5"):
        refit.refit_engine(Engine(), manifest(), {"lin.bias": torch.zeros(6)},
                           refitter=RecordingRefitter({**protos, "lin.bias": (torch.float16, 5)}))


def test_a_failed_refit_is_an_error_with_tensorrts_message():
    protos = {"val_12": (torch.bfloat16, 24), "lin.bias": (torch.float16, 6), "val_7": (torch.float16, 4)}
    error = "IRefitter::refitCudaEngine: Error Code 1: Cuda Runtime (an illegal memory access was encountered)"
    refitter = RecordingRefitter(protos, refit_error=error)
    with pytest.raises(refit.RefitError, match=r"refit_cuda_engine failed: .*an illegal memory access"):
        refit.refit_engine(Engine(), manifest(), {"lin.bias": torch.zeros(6)}, refitter=refitter)
    assert refitter.refitted == 0


def _one_matmul_onnx(path):
    w = helper.make_tensor("W", TensorProto.FLOAT16, [4, 6], torch.randn(4, 6).half().numpy().tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 6])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("flags", [(), ("REFIT",), ("REFIT_IDENTICAL",), ("REFIT_INDIVIDUAL",), ("REFIT", "STRIP_PLAN")])
def test_the_library_cannot_build_or_open_a_refittable_engine_here(tmp_path, flags):
    """Why the refit checks use a stand-in (the module doc): TensorRT-RTX itself, on a one-MatMul network,
    one target (8.9). Without a refit flag it builds ('legacy CPU-only mode'); with any, its compiler needs
    CUDA. And no engine opens. When this fails, this machine can build a refittable engine: check the map
    against its Refitter's get_all_weights() here instead of the parser's weights."""
    if torch.cuda.is_available():
        pytest.skip("the CPU-only limitation")
    logger = get_logger(RTX)
    builder = RTX.Builder(logger)
    network = builder.create_network(0)
    parser = RTX.OnnxParser(network, logger)
    assert parser.parse_from_file(str(_one_matmul_onnx(tmp_path / "m.onnx")))
    if "REFIT_INDIVIDUAL" in flags:
        assert network.mark_weights_refittable("W")
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(RTX.ComputeCapability.SM89, 0)
    for flag in flags:
        config.set_flag(getattr(RTX.BuilderFlag, flag))
    with logger.capture() as logged:
        plan = builder.build_serialized_network(network, config)
    if not flags:
        assert plan is not None
        with logger.capture() as logged:
            assert RTX.Runtime(logger).deserialize_cuda_engine(plan) is None
        assert any("cudaError 35: CUDA driver version is insufficient for CUDA runtime version" in m for m in logged)
        return
    assert plan is None
    assert any("MyelinCheckException: graph_jit.cpp:278: CHECK(status == CUDA_SUCCESS) failed.  In compileGraph" in m
               for m in logged), logged


def test_engine_holds_its_own_weights_and_refuses_without_refit():
    engine = TensorRTDenoiserEngine.__new__(TensorRTDenoiserEngine)
    engine.trt, engine.manifest = Engine(), manifest(refittable=False, refit_weights={})
    assert TensorRTDenoiserEngine.holds_own_weights
    with pytest.raises(refit.RefitError, match="--refittable"):
        engine.update_weights({"layers.0.attention.to_q.weight": torch.zeros(1)})


def test_manifest_keeps_and_checks_the_refit_map(tmp_path):
    (tmp_path / "e.plan").write_bytes(b"x" * 64)
    from zimage_trt.engines.manifest import record_file
    m = manifest(files=[record_file(tmp_path / "e.plan")])
    again = Manifest.read(m.write(tmp_path))
    assert again.refittable and again.refit_weights == m.refit_weights
    raw = json.loads((tmp_path / "d.manifest.json").read_text())
    raw["refit_weights"]["val_12"] = [["lin.weight"], "rot90"]
    (tmp_path / "d.manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="refit_weights"):
        Manifest.read(tmp_path / "d.manifest.json")


@pytest.mark.parametrize("backend, precision, message", [
    ("torch-compiled", "fp16", "refittable applies to TensorRT engines"),
    ("tensorrt-rtx", "fp8", "refittable FP8 engines are not supported"),
])
def test_build_refuses_refittable_where_it_means_nothing(tmp_path, backend, precision, message):
    with pytest.raises(ValueError, match=message):
        build_engines(make_tiny_components()["transformer"], ["256x256"], tmp_path, backend=backend,
                      precision=precision, refittable=True, progress=False)


def test_cli_build_documents_refittable(capsys):
    with pytest.raises(SystemExit):
        cli_main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--refittable" in out and "larger engine file" in out and "(default: False)" in out


def test_update_weights_refits_then_releases_captured_graphs():
    refitter = RecordingRefitter({"val_12": (torch.bfloat16, 24), "lin.bias": (torch.float16, 6), "val_7": (torch.float16, 4)})
    trt = RecordingTrt()
    trt.Refitter = lambda cuda_engine, logger: refitter
    released = []

    class RefittableEngine(Engine):
        def release_graphs(self):
            released.append(refitter.refitted)  # after the refit, not before

    engine = TensorRTDenoiserEngine.__new__(TensorRTDenoiserEngine)
    engine.trt, engine.manifest = RefittableEngine(), manifest()
    engine.trt.trt = trt
    engine.update_weights({"lin.bias": torch.ones(6)})
    assert set(refitter.set) == {"lin.bias"} and released == [1]
