"""A real TensorRT-RTX build of the tiny model's ControlNet-ready engine variant, on the CPU through
`build_engines(..., controlnet=<a ZImageControlNetModel folder>)`: its manifest (places, hint shapes), its
network I/O against engines/contract.py (the hint input, its dtype, its shape in every profile), and the
open path up to where CUDA is needed. As in tests/test_tensorrt_engine_build.py, no engine executes here
(no CUDA driver); the GPU test runs only where TensorRT-RTX runs engines (not Hopper).
"""

import onnx
import pytest
import torch
from diffusers import ZImageControlNetModel

from zimage_trt.compiler.build import build_engines
from zimage_trt.engines import contract
from zimage_trt.engines.manifest import FORMAT_VERSION, Manifest
from zimage_trt.engines.tensorrt.denoiser import TensorRTDenoiserEngine, check_engine_against_manifest
from zimage_trt.engines.tensorrt.library import BackendUnavailableError, TensorRTBackendError, import_backend
from zimage_trt.engines.tensorrt.runtime import TensorRTEngine
from zimage_trt.model.shapes import Resolution
from zimage_trt.testing.tiny import make_tiny_components

pytestmark = pytest.mark.slow
try:
    _, RTX = import_backend("tensorrt-rtx")
except BackendUnavailableError as exc:
    if not torch.cuda.is_available():  # CI installs the rtx extra: there this module must run
        raise
    pytest.skip(f"TensorRT-RTX is not installed here: {exc}", allow_module_level=True)

from test_tensorrt_engine_build import EngineFromBuildInfo  # noqa: E402  (the build's I/O as an ICudaEngine)

RESOLUTIONS = ["256x256", "256x384"]
PLACES = [0, 1]


def save_tiny_controlnet(folder):
    """A tiny Union-2.x-layout ControlNet for the tiny transformer (dim 64, 2 heads, both main layers)."""
    torch.manual_seed(0)
    ZImageControlNetModel(control_layers_places=PLACES, control_refiner_layers_places=[0], control_in_dim=16,
                          add_control_noise_refiner="control_noise_refiner", dim=64, n_refiner_layers=1, n_heads=2,
                          n_kv_heads=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fp16 ControlNet-ready build (ONNX export + two profiles), with the default engine name."""
    out = tmp_path_factory.mktemp("rtx-controlnet")
    controlnet = save_tiny_controlnet(out / "controlnet")
    transformer = make_tiny_components()["transformer"]
    result = build_engines(transformer, RESOLUTIONS, out, backend="tensorrt-rtx", precision="fp16", batch=2,
                           caption_capacity=64, compute_capabilities=["8.9", "12.0"], progress=False,
                           controlnet=controlnet)
    return {"out": out, "result": result, "manifest": result.manifest, "dim": transformer.config.dim,
            "caption_dim": transformer.config.cap_feat_dim}


def expected_profiles(built):
    return [contract.controlnet_input_shapes(len(PLACES), s.batch, Resolution.parse(s.resolution).latent_hw,
                                             s.caption_capacity, built["caption_dim"], built["dim"])
            for s in built["manifest"].shapes]


def test_manifest_records_the_variant_its_places_and_hint_shapes(built):
    manifest = Manifest.read(built["result"].manifest_path)
    assert manifest.name == "denoiser-tensorrt-rtx-fp16-controlnet-0-1"  # beside, not over, a plain engine
    assert manifest.format_version == FORMAT_VERSION == 2
    assert manifest.controlnet_places == PLACES
    # [P, B, image tokens padded to 32 + captions, dim]: 256x256 -> 16x16 tokens, 256x384 -> 16x24 tokens.
    assert manifest.controlnet_hint_shapes == [[2, 2, 256 + 64, 64], [2, 2, 384 + 64, 64]]
    assert manifest.controlnet_hint_shapes == [list(p[contract.CONTROLNET_HINTS]) for p in expected_profiles(built)]
    manifest.verify_files(built["out"])


def test_network_io_is_the_controlnet_contract(built):
    engine = built["result"].details["engine"]
    assert list(engine["inputs"]) == list(contract.CONTROLNET_INPUT_NAMES)
    assert list(engine["outputs"]) == list(contract.OUTPUT_NAMES)
    dtypes = {n: i["dtype"] for n, i in {**engine["inputs"], **engine["outputs"]}.items()}
    assert dtypes == {"latents": "FLOAT", "timestep": "FLOAT", "cap_feats": "HALF", "cap_lens": "INT64",
                      contract.CONTROLNET_HINTS: "HALF", "noise_pred": "FLOAT"}  # hints in the engine's dtype
    # P and dim fixed in the network; batch and tokens are the profiles'.
    assert engine["inputs"][contract.CONTROLNET_HINTS]["shape"] == [2, -1, -1, 64]
    assert [{n: tuple(v) for n, v in p.items()} for p in engine["profiles"]] == expected_profiles(built)
    onnx_model = onnx.load(str(built["out"] / "onnx" / f"{built['manifest'].name}.onnx"), load_external_data=False)
    hints = {i.name: i for i in onnx_model.graph.input}[contract.CONTROLNET_HINTS]
    assert hints.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_open_checks_pass_and_a_manifest_of_the_other_variant_is_refused(built):
    manifest, out = built["manifest"], built["out"]
    path = out / manifest.files[0].name
    stand_in = EngineFromBuildInfo(built["result"].details["engine"])
    opened = TensorRTEngine.from_deserialized(RTX, stand_in, flavor="tensorrt-rtx", device="cpu", source=str(path))
    check_engine_against_manifest(opened, manifest)  # names, dtypes, every shape's profile with its hint shape
    engine = TensorRTDenoiserEngine(path, manifest, "cpu", trt_engine=opened)
    assert engine.takes_controlnet_hints and engine.control_places == (0, 1) and engine.hint_dim == 64
    plain = Manifest(**{**manifest.__dict__, "controlnet_places": [], "controlnet_hint_shapes": []})
    with pytest.raises(TensorRTBackendError, match="its manifest says plain"):
        check_engine_against_manifest(opened, plain)


def test_fp8_variant_builds_with_its_hints_left_16_bit(tmp_path):
    """FP8: the Q/DQ pass calibrates through onnxruntime with the hint input fed (zero hints), and the hints
    stay in the graph's 16-bit dtype (only the block projections are e4m3)."""
    transformer = make_tiny_components()["transformer"]
    result = build_engines(transformer, "256x256", tmp_path, backend="tensorrt-rtx", precision="fp8",
                           caption_capacity=32, compute_capabilities=["8.9"], progress=False, controlnet=PLACES)
    engine = result.details["engine"]
    assert result.details["onnx"]["fp8"]["weights_fp8"] > 0
    assert engine["inputs"][contract.CONTROLNET_HINTS]["dtype"] == "HALF"
    assert engine["profiles"][0][contract.CONTROLNET_HINTS] == [2, 1, 256 + 32, 64]
    assert Manifest.read(result.manifest_path).controlnet_places == PLACES


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_controlnet_engine_matches_eager_with_hints(tmp_path):
    """Where TensorRT-RTX runs engines (RTX-class GPUs, not Hopper): the ControlNet-ready engine with random
    hints against the eager static denoiser with the same hints, and with none against the plain forward.
    fp16 engine vs fp16 eager: two code paths' rounding over the tiny model, as the plain engine's test."""
    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" not in ("7.5", "8.0", "8.6", "8.7", "8.9", "12.0", "12.1"):
        pytest.skip(f"TensorRT-RTX cannot run on compute capability {major}.{minor}")
    from zimage_trt.engines.select import open_denoiser
    from zimage_trt.model.denoiser import StaticZImageDenoiser

    transformer = make_tiny_components()["transformer"]
    build_engines(transformer, ["256x256"], tmp_path, backend="tensorrt-rtx", precision="fp16", caption_capacity=64,
                  controlnet=PLACES, progress=False)
    cuda = transformer.to("cuda", torch.float16)
    engine = open_denoiser(cuda, tmp_path, "cuda", torch.float16, "256x256", 1, controlnet_places=PLACES)
    eager = StaticZImageDenoiser(cuda, {k: tuple(v) for k, v in engine.manifest.fp16_downscale_log2.items()})
    eager.set_control_places(PLACES)
    feed = contract.example_inputs(1, (32, 32), 64, eager.caption_dim, torch.float16, "cuda", caption_length=40)
    hints = contract.example_hints(2, 1, (32, 32), 64, eager.dim, torch.float16, "cuda")
    with torch.no_grad():
        want, plain = eager(*feed, controlnet_hints=hints).float(), eager(*feed).float()
    torch.testing.assert_close(engine.run(*feed, masked=True, controlnet_hints=hints).float(), want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(engine.run(*feed, masked=True).float(), plain, rtol=3e-2, atol=3e-2)
