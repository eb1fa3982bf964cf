"""A real TensorRT-RTX engine of the tiny model, built on the CPU through `build_engines`, taken as far as
anything goes without a GPU: its manifest, its I/O against the contract, its profiles, the open path up
to where CUDA is needed, and the refit map of its ONNX against TensorRT's own weight names.

What cannot run here, and why: deserialising a TensorRT-RTX engine needs a CUDA driver (this machine
has none: TensorRT logs cudaError 35), so no engine is executed and no `trt.Refitter` is created in CI;
TensorRT-RTX 1.7.1 cannot even build a refittable engine without one, whatever the refit flag ("graph_jit.cpp:278:
CHECK(status == CUDA_SUCCESS) failed. In compileGraph": test_tensorrt_refit.py checks both, with the
library's messages), so the refittable build itself is a gpu test, and the refit map is checked here
against the weights TensorRT-RTX's parser gives the network (its names, dtypes and sizes, not the ONNX as
our map read it). The GPUs reachable to this project
(H100/H200) are refused by TensorRT-RTX's runtime (compute capability 9.0): the execution test needs an
RTX-class GPU (Turing to Blackwell consumer/workstation).
"""

import json

import numpy as np
import onnx
import pytest
import torch

from zimage_trt.compiler import tensorrt_build
from zimage_trt.compiler.build import build_engines
from zimage_trt.engines import contract
from zimage_trt.engines.manifest import Manifest
from zimage_trt.engines.tensorrt import refit
from zimage_trt.engines.tensorrt.denoiser import TensorRTDenoiserEngine, check_engine_against_manifest
from zimage_trt.engines.tensorrt.library import EngineBuildError, TensorRTBackendError, get_logger
from zimage_trt.engines.tensorrt.runtime import TensorRTEngine
from zimage_trt.testing.tiny import make_tiny_components

from rtx_backend import rtx_or_skip_module

pytestmark = pytest.mark.slow
RTX = rtx_or_skip_module()
RESOLUTIONS = ["256x256", "256x384"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fp16 build for the module (ONNX export + two profiles; minutes on a busy CPU), and the refit map
    a refittable build of the same ONNX records (the build itself needs a GPU here: see the module doc)."""
    out = tmp_path_factory.mktemp("rtx")
    transformer = make_tiny_components()["transformer"]
    result = build_engines(transformer, RESOLUTIONS, out, backend="tensorrt-rtx", precision="fp16", batch=2,
                           caption_capacity=64, compute_capabilities=["8.9", "12.0"], progress=False, name="tiny")
    state = {k: v.to(torch.float16) for k, v in transformer.state_dict().items()}
    onnx_path = out / "onnx" / "tiny.onnx"
    refittable = Manifest(**{**result.manifest.__dict__, "refittable": True,
                             "refit_weights": refit.map_initializers(onnx_path, state)})
    return {"out": out, "result": result, "manifest": result.manifest, "state": state, "onnx": onnx_path,
            "refittable": refittable}


def test_manifest_records_what_selection_compares(built):
    manifest = Manifest.read(built["result"].manifest_path)
    assert manifest.backend == "tensorrt-rtx" and manifest.backend_version == RTX.__version__
    assert manifest.compute_capabilities == ["8.9", "12.0"]
    assert [(s.resolution, s.batch, s.caption_capacity) for s in manifest.shapes] == [(r, 2, 64) for r in RESOLUTIONS]
    assert not manifest.refittable and manifest.refit_weights == {}  # off by default
    manifest.verify_files(built["out"])
    engine = built["result"].details["engine"]
    assert engine["builder_flags"] == ["REQUIRE_USER_ALLOCATION"] and not engine["refittable"]


def test_refittable_rtx_build_without_a_gpu_says_where_to_build(built, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU-only limitation")
    profile = built["result"].details["engine"]["profiles"][0]
    with pytest.raises(EngineBuildError, match="refittable engines only on a machine with a CUDA GPU") as refused:
        tensorrt_build.build_tensorrt_engine(built["onnx"], tmp_path / "r.plan", [profile], flavor="tensorrt-rtx",
                                             compute_capabilities=["8.9"], refittable=True, progress=False)
    assert "CHECK(status == CUDA_SUCCESS) failed" in str(refused.value)  # the library's own words, passed on
    assert not (tmp_path / "r.plan").exists()


def test_network_io_is_the_contract(built):
    engine = built["result"].details["engine"]
    assert list(engine["inputs"]) == list(contract.INPUT_NAMES) and list(engine["outputs"]) == list(contract.OUTPUT_NAMES)
    dtypes = {n: i["dtype"] for n, i in {**engine["inputs"], **engine["outputs"]}.items()}
    assert dtypes == {"latents": "FLOAT", "timestep": "FLOAT", "cap_feats": "HALF", "cap_lens": "INT64",
                      "noise_pred": "FLOAT"}
    for shape, prof in zip(built["manifest"].shapes, engine["profiles"]):
        want = contract.input_shapes(2, shape.size.latent_hw, 64, prof["cap_feats"][-1])
        assert {n: tuple(v) for n, v in prof.items()} == want


class EngineFromBuildInfo:
    """The I/O and profiles a deserialised engine reports, taken from what the build read from the network
    (deserialising needs a GPU); lets the open-time checks run against the real build."""

    def __init__(self, info):
        self.io = {**info["inputs"], **info["outputs"]}
        self.names, self.info = list(self.io), info
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(info["profiles"])
        self.refittable = info["refittable"]

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return RTX.TensorIOMode.INPUT if name in self.info["inputs"] else RTX.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return getattr(RTX.DataType, self.io[name]["dtype"])

    def get_tensor_profile_shape(self, name, p):
        shape = tuple(self.info["profiles"][p][name])
        return shape, shape, shape

    def create_runtime_config(self):
        return _RuntimeConfig()

    def create_execution_context(self, *args):
        raise AssertionError("no context is made before a shape is used")


class _RuntimeConfig:
    dynamic_shapes_kernel_specialization_strategy = None

    def set_execution_context_allocation_strategy(self, strategy):
        self.strategy = strategy


def test_open_checks_pass_and_stop_where_cuda_is_needed(built):
    manifest, path = built["manifest"], built["out"] / built["manifest"].files[0].name
    stand_in = EngineFromBuildInfo(built["result"].details["engine"])
    opened = TensorRTEngine.from_deserialized(RTX, stand_in, flavor="tensorrt-rtx", device="cpu", source=str(path))
    check_engine_against_manifest(opened, manifest)  # I/O names, dtypes, every manifest shape has its profile
    engine = TensorRTDenoiserEngine(path, manifest, "cpu", trt_engine=opened)
    assert engine.dtype is torch.float16 and engine.caption_layout([40], "256x384", 1) == (64, True)
    if not torch.cuda.is_available():
        with pytest.raises(TensorRTBackendError, match="needs a CUDA GPU"):
            TensorRTDenoiserEngine(path, manifest, "cpu")


def test_refit_map_holds_every_trained_weight_bitwise(built):
    """Every mapped initializer equals its transformer weight (transposed where recorded), bitwise."""
    manifest, state = built["refittable"], built["state"]
    inits = {i.name: i for i in onnx.load(str(built["onnx"])).graph.initializer}
    for engine_name, (names, transform) in manifest.refit_weights.items():
        value = refit._initializer_tensor(inits[engine_name], built["onnx"].parent)
        for name in names:
            want = state[name].t() if transform == "T" else state[name]
            assert value.dtype == want.dtype and torch.equal(value, want), engine_name
    # The tiny model's norms are all ones (constant-valued: never refitted); every other weight is mapped.
    left_out = refit.unmapped_weights(manifest.refit_weights, state)
    assert all(bool((state[n] == state[n].flatten()[0]).all()) or n == "x_pad_token" for n in left_out), left_out
    assert any(t == "T" for _, t in manifest.refit_weights.values())  # the exporter's transposed projections


def test_tensorrt_knows_every_mapped_name_as_a_weight(built):
    """TensorRT-RTX's parser, on the CPU, names the network's weights after the ONNX initializers: each
    mapped name must be one it can mark refittable (an unknown name is refused with 'no weights named')."""
    logger = get_logger(RTX)
    builder = RTX.Builder(logger)
    network = builder.create_network(0)
    parser = RTX.OnnxParser(network, logger)
    assert parser.parse_from_file(str(built["onnx"]))
    for engine_name in built["refittable"].refit_weights:
        assert network.mark_weights_refittable(engine_name), engine_name
    with logger.capture() as logged:
        assert not network.mark_weights_refittable("layers.0.attention.to_q.weight")  # a diffusers name is not one
    assert any("no weights named" in m for m in logged)


def network_weights(onnx_path) -> dict[str, tuple]:
    """{name: (numpy dtype, count)} of every floating-point weight TensorRT-RTX's ONNX parser puts in the
    network (its constant layers, named after the initializers they hold: the names a refittable engine's
    Refitter reports), read from the parsed network on the CPU."""
    logger = get_logger(RTX)
    builder = RTX.Builder(logger)
    network = builder.create_network(0)
    parser = RTX.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    weights = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == RTX.LayerType.CONSTANT:
            layer.__class__ = RTX.IConstantLayer  # (TensorRT's Python idiom for the layer's own interface)
            values = layer.weights
            if values.dtype in (np.float16, np.float32):
                weights[layer.name] = (values.dtype, int(values.size))
    return weights


class NetworkRefitter:
    """Stands in for trt.Refitter over the built engine with the weights TensorRT-RTX's parser holds
    (`network_weights`, not the ONNX file our map was read from); refuses, as the real one does with an
    error logged, values of another dtype or size; records what is set."""

    def __init__(self, weights):
        self.weights, self.set, self.refitted = weights, {}, False

    def get_all_weights(self):
        return list(self.weights)

    def get_weights_prototype(self, name):
        dtype, count = self.weights[name]
        return RTX.Weights(RTX.float16 if dtype == np.float16 else RTX.float32, 0, count)

    def set_named_weights(self, name, weights, location):
        proto = self.get_weights_prototype(name)
        if weights.dtype != proto.dtype or weights.size != proto.size:
            get_logger(RTX).log(RTX.ILogger.Severity.ERROR, f"IRefitter::setNamedWeights: Error Code 3: API Usage Error "
                                f"({name}: {weights.size} x {weights.dtype} given, {proto.size} x {proto.dtype} held)")
            return False
        self.set[name] = weights
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self):
        self.refitted = True
        return True


def test_refitter_accepts_every_mapped_weight_by_name(built):
    """update_weights' path with the full state dict against the weights TensorRT's parser holds: every
    mapped name is one of them, with the dtype and size the engine holds, then one refit. (A real Refitter
    needs a GPU: see the gpu test below.)"""
    manifest, state = built["refittable"], built["state"]
    held = network_weights(built["onnx"])
    assert set(manifest.refit_weights) <= set(held), sorted(set(manifest.refit_weights) - set(held))[:5]
    for engine_name, (names, _) in manifest.refit_weights.items():
        assert held[engine_name] == (np.float16, state[names[0]].numel()), engine_name
    mapped = {n for names, _ in manifest.refit_weights.values() for n in names}
    engine = type("E", (), {"refittable": True, "trt": RTX, "device": torch.device("cpu"), "_engine": None})()
    refitter = NetworkRefitter(held)
    names = refit.refit_engine(engine, manifest, {n: state[n].float() for n in mapped}, refitter=refitter)
    assert set(names) == set(refitter.set) == set(manifest.refit_weights) and refitter.refitted


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_refittable_build_records_the_map(tmp_path):
    """Any GPU with a driver (an H100 too: this builds for 8.9, it does not run): the refittable build that
    the CPU cannot do, with its map in the manifest."""
    transformer = make_tiny_components()["transformer"]
    result = build_engines(transformer, ["256x256"], tmp_path, backend="tensorrt-rtx", precision="fp16",
                           caption_capacity=64, compute_capabilities=["8.9"], refittable=True, progress=False)
    manifest = Manifest.read(result.manifest_path)
    assert manifest.refittable and manifest.refit_weights and result.details["engine"]["refittable"]
    assert "REFIT" in result.details["engine"]["builder_flags"]


def _runnable_gpu():
    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" not in ("7.5", "8.0", "8.6", "8.7", "8.9", "12.0", "12.1"):
        pytest.skip(f"TensorRT-RTX cannot run on compute capability {major}.{minor}")


@pytest.mark.gpu
def test_gpu_engine_matches_eager_and_refits(tmp_path):
    """On a GPU TensorRT-RTX runs (not Hopper): the engine against eager torch, then a refit of changed
    weights against eager torch with the same change. Builds for this GPU (the module's build targets others)."""
    _runnable_gpu()
    from zimage_trt.engines.select import open_denoiser
    from zimage_trt.model.denoiser import StaticZImageDenoiser

    transformer = make_tiny_components()["transformer"]
    build_engines(transformer, ["256x256"], tmp_path, backend="tensorrt-rtx", precision="fp16", batch=1,
                  caption_capacity=64, refittable=True, progress=False, name="gpu")
    cuda = transformer.to("cuda", torch.float16)
    engine = open_denoiser(cuda, tmp_path, "cuda", torch.float16, "256x256", 1)
    eager = StaticZImageDenoiser(cuda, {k: tuple(v) for k, v in engine.manifest.fp16_downscale_log2.items()})
    feed = contract.example_inputs(1, (32, 32), 64, eager.caption_dim, torch.float16, "cuda", caption_length=40)
    torch.testing.assert_close(engine.run(*feed, masked=True).float(), eager(*feed).float(), rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        w = cuda.layers[0].attention.to_q.weight
        w.add_(0.05 * torch.randn_like(w))
    engine.update_weights({"layers.0.attention.to_q.weight": w})
    torch.testing.assert_close(engine.run(*feed, masked=True).float(), eager(*feed).float(), rtol=3e-2, atol=3e-2)
    json.dumps(engine.manifest.refit_weights)  # (the map is plain JSON)


def test_validity_check_of_the_real_engine_gives_tensorrts_reason(built):
    """On this machine TensorRT-RTX cannot read the GPU: validity is INVALID with no flag (it used to print
    as "0"); the reason is what it logged."""
    if torch.cuda.is_available():
        pytest.skip("the no-driver case")
    from zimage_trt.engines.tensorrt.runtime import describe_invalidity

    logger = get_logger(RTX)
    runtime = RTX.Runtime(logger)
    header = (built["out"] / built["manifest"].files[0].name).read_bytes()[: runtime.engine_header_size]
    with logger.capture() as logged:
        validity, diagnostics = runtime.get_engine_validity(header)
    assert validity == RTX.EngineValidity.INVALID
    assert "cuda" in describe_invalidity(RTX, diagnostics, logged).lower()
