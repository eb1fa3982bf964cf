"""zimage_trt.engines.tensorrt.runtime: real TensorRT-RTX engine builds on the CPU, errors, cancellation, runtime on GPU."""

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from zimage_trt.compiler import tensorrt_build
from zimage_trt.engines.tensorrt import library as trt_library
from zimage_trt.engines.tensorrt import runtime as trt_runtime

FLAVORS = trt_library.available_flavors()
HAVE_RTX = FLAVORS["tensorrt-rtx"][0]
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason=f"tensorrt_rtx unavailable: {FLAVORS['tensorrt-rtx'][1]}")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

INPUTS = ["latents", "timestep", "cap_feats", "cap_lens"]
CAP_DIM = 32


class TinyDenoiser(torch.nn.Module):
    """Same I/O contract as the real transformer: fp16 latents/captions, fp32 timestep, int64 lengths."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1).half()
        self.t_proj = torch.nn.Linear(1, 16)
        self.c_proj = torch.nn.Linear(CAP_DIM, 16).half()

    def forward(self, latents, timestep, cap_feats, cap_lens):
        temb = self.t_proj(timestep[:, None])  # [B,16] fp32
        cap = self.c_proj(cap_feats)  # [B,C,16] fp16
        keep = (torch.arange(cap_feats.shape[1], device=cap_feats.device)[None, :] < cap_lens[:, None]).to(cap.dtype)
        pooled = (cap * keep[..., None]).sum(1) / cap_lens[:, None].clamp(min=1).to(cap.dtype)
        x = self.conv(latents)
        return x + (temb.to(x.dtype) + pooled)[:, :, None, None]


def example_inputs(batch=1, h=16, w=24, c=48, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(batch, 16, h, w, generator=g).half().to(device),
        "timestep": torch.rand(batch, generator=g).to(device),
        "cap_feats": torch.randn(batch, c, CAP_DIM, generator=g).half().to(device),
        "cap_lens": torch.full((batch,), min(5, c), dtype=torch.int64).to(device),
    }


def profile(batch=1, h=16, w=24, c=48):
    return {"latents": (batch, 16, h, w), "timestep": (batch,), "cap_feats": (batch, c, CAP_DIM), "cap_lens": (batch,)}


PROFILES = [profile(h=16, w=24, c=48), profile(h=32, w=32, c=64)]


def export_onnx(module, path: Path) -> None:
    """Export with the dynamo exporter (dynamic B, h, w, C): the kind of graph users' engines are built from.
    No fallback to the legacy exporter: if the dynamo export breaks, the tests that need this graph fail."""
    args = tuple(example_inputs().values())
    B = torch.export.Dim("batch", min=1, max=16)
    H = torch.export.Dim("h", min=2, max=512)
    W = torch.export.Dim("w", min=2, max=512)
    C = torch.export.Dim("cap_len", min=2, max=1024)
    dynamic_shapes = {
        "latents": {0: B, 2: H, 3: W},
        "timestep": {0: B},
        "cap_feats": {0: B, 1: C},
        "cap_lens": {0: B},
    }
    torch.onnx.export(module, args, str(path), input_names=INPUTS, output_names=["noise_pred"],
                      dynamo=True, dynamic_shapes=dynamic_shapes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    module = TinyDenoiser().eval()
    onnx_path = d / "tiny.onnx"
    t0 = time.perf_counter()
    export_onnx(module, onnx_path)
    print(f"\nONNX export (dynamo): {time.perf_counter() - t0:.1f}s")
    return {"dir": d, "onnx": onnx_path, "module": module}


def leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------ no library needed


def test_available_flavors_reports_every_flavor_with_reason():
    assert set(FLAVORS) == {"tensorrt", "tensorrt-rtx"}
    for ok, reason in FLAVORS.values():
        assert isinstance(ok, bool) and reason
    if not FLAVORS["tensorrt"][0]:
        assert "import tensorrt" in FLAVORS["tensorrt"][1]


def test_unknown_flavor_lists_available_ones(tiny, tmp_path):
    with pytest.raises(ValueError) as err:
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES, flavor="tensorrt-llm", progress=False)
    msg = str(err.value)
    assert "tensorrt-llm" in msg and "tensorrt-rtx" in msg and "'tensorrt'" in msg
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.skipif(FLAVORS["tensorrt"][0], reason="full TensorRT is installed here")
def test_unavailable_flavor_explains_why(tiny, tmp_path):
    with pytest.raises(trt_library.BackendUnavailableError) as err:
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES, flavor="tensorrt", progress=False)
    msg = str(err.value)
    assert "import tensorrt" in msg and "tensorrt-rtx" in msg


@pytest.mark.parametrize(
    "text,expected",
    [("8.9", "8.9"), ("12.0", "12.0"), ("sm_86", "8.6"), ("SM120", "12.0"), ("75", "7.5"), ((8, 0), "8.0"), ("current", "current")],
)
def test_parse_compute_capability(text, expected):
    assert trt_library.parse_compute_capability(text) == expected


def test_parse_compute_capability_rejects_garbage():
    with pytest.raises(ValueError, match="compute capability"):
        trt_library.parse_compute_capability("ampere")


# ------------------------------------------------------------------------------ TensorRT-RTX on the CPU


@needs_rtx
def test_rtx_supported_compute_capabilities():
    ccs = trt_library.rtx_supported_compute_capabilities()
    assert {"8.6", "8.9", "12.0"} <= set(ccs)
    assert ccs == sorted(ccs, key=lambda c: tuple(map(int, c.split("."))))


@needs_rtx
def test_torch_dtype_mapping():
    trt = trt_library.import_backend("tensorrt-rtx")[1]
    assert trt_library.torch_dtype(trt.float32) is torch.float32
    assert trt_library.torch_dtype(trt.float16) is torch.float16
    assert trt_library.torch_dtype(trt.bfloat16) is torch.bfloat16
    assert trt_library.torch_dtype(trt.int32) is torch.int32
    assert trt_library.torch_dtype(trt.int64) is torch.int64
    assert trt_library.torch_dtype(trt.bool) is torch.bool
    if hasattr(trt, "fp8") and hasattr(torch, "float8_e4m3fn"):
        assert trt_library.torch_dtype(trt.fp8) is torch.float8_e4m3fn


@needs_rtx
def test_build_two_profiles_into_one_engine(tiny, tmp_path):
    engine = tmp_path / "tiny.plan"
    cache = tmp_path / "tiny.timing-cache"
    info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], engine, PROFILES, flavor="tensorrt-rtx",
                                    timing_cache_path=cache, progress=True)
    print(f"\nTensorRT-RTX {info['version']} tiny build: {info['build_seconds']:.3f}s, "
          f"{info['engine_bytes']} bytes, targets {info['compute_capabilities']} ({info['compute_capabilities_source']})")

    data = engine.read_bytes()
    assert engine.is_file() and len(data) == info["engine_bytes"] > 4096
    assert b"trt" in data[:32]  # engine header magic
    assert leftovers(tmp_path) == []

    assert info["flavor"] == "tensorrt-rtx" and info["library"] == "tensorrt_rtx"
    assert info["profiles"] == [{k: list(v) for k, v in p.items()} for p in PROFILES]
    assert info["inputs"]["latents"] == {"shape": [-1, 16, -1, -1], "dtype": "HALF"}
    assert info["inputs"]["timestep"]["dtype"] == "FLOAT"
    assert info["inputs"]["cap_lens"]["dtype"] == "INT64"
    assert info["outputs"]["noise_pred"]["dtype"] == "HALF"  # strongly typed: precision from the ONNX
    assert info["strongly_typed"] in (True, None)
    if not torch.cuda.is_available():
        assert info["compute_capabilities"] == [c for c in trt_library.rtx_supported_compute_capabilities()
                                                if tuple(map(int, c.split("."))) >= (8, 0)]

    tc = info["timing_cache"]
    if tc["used"]:  # a library that autotunes (full TensorRT): the cache is written and reused
        assert cache.is_file() and tc["saved_bytes"] > 0
        again = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "again.plan", PROFILES, flavor="tensorrt-rtx",
                                         timing_cache_path=cache, progress=False)
        assert again["timing_cache"]["loaded_bytes"] == tc["saved_bytes"]
    else:  # TensorRT-RTX: no build-time autotuning, so no timing cache file; the reason says what applies
        assert not cache.exists()
        assert "runtime cache" in tc["reason"]
        again = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "again.plan", PROFILES, flavor="tensorrt-rtx",
                                         timing_cache_path=cache, progress=False)
        assert not cache.exists() and not again["timing_cache"]["used"]
    print(f"second build: {again['build_seconds']:.3f}s")


@needs_rtx
def test_build_for_named_compute_capabilities(tiny, tmp_path):
    info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "cc.plan", PROFILES[:1], flavor="tensorrt-rtx",
                                    compute_capabilities=["sm_89", "12.0"], progress=False)
    assert info["compute_capabilities"] == ["8.9", "12.0"]
    assert (tmp_path / "cc.plan").stat().st_size == info["engine_bytes"]


@needs_rtx
def test_build_replaces_previous_engine_atomically(tiny, tmp_path):
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"old engine")
    info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], engine, PROFILES[:1], flavor="tensorrt-rtx", progress=False)
    assert engine.stat().st_size == info["engine_bytes"] and engine.read_bytes() != b"old engine"
    assert leftovers(tmp_path) == []


@needs_rtx
def test_cancel_event_writes_nothing_and_keeps_previous_engine(tiny, tmp_path):
    engine = tmp_path / "e.plan"
    previous = b"PREVIOUS ENGINE \x00\x01\x02" * 100
    engine.write_bytes(previous)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(trt_library.BuildCancelledError, match="cancelled"):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], engine, PROFILES, flavor="tensorrt-rtx", progress=True, cancel=cancel)
    assert engine.read_bytes() == previous
    assert leftovers(tmp_path) == []
    with pytest.raises(trt_library.BuildCancelledError):  # and where no engine existed, none appears
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "new.plan", PROFILES, flavor="tensorrt-rtx",
                                 progress=False, cancel=cancel)
    assert not (tmp_path / "new.plan").exists()


@needs_rtx
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_during_build_writes_nothing(tiny, tmp_path):
    """A real SIGINT in the middle of the build: KeyboardInterrupt comes out, no engine file is written."""

    class InterruptOnFirstCheck(threading.Event):
        fired = False

        def is_set(self):
            if not self.fired:
                self.fired = True
                signal.raise_signal(signal.SIGINT)  # delivered to the handler installed by the build
            return super().is_set()

    engine = tmp_path / "e.plan"
    engine.write_bytes(b"previous")
    event = InterruptOnFirstCheck()
    with pytest.raises(KeyboardInterrupt):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], engine, PROFILES, flavor="tensorrt-rtx", progress=False, cancel=event)
    assert event.fired
    assert engine.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@needs_rtx
def test_profile_missing_an_input(tiny, tmp_path):
    bad = dict(PROFILES[0])
    del bad["cap_feats"]
    with pytest.raises(trt_library.ProfileError, match=r"profile #1 is missing dynamic input\(s\) \['cap_feats'\]"):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", [PROFILES[0], bad], flavor="tensorrt-rtx",
                                 progress=False)
    assert not (tmp_path / "x.plan").exists()


@needs_rtx
@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"latents": (1, 16, 32)}, r"'latents' has rank 4 .* rank 3"),
        ({"latents": (1, 8, 16, 24)}, r"'latents' dim 1 is fixed to 16"),
        ({"cap_feats": (1, 0, CAP_DIM)}, r"'cap_feats' dim 1 must be positive"),
        ({"bogus": (1,)}, r"\['bogus'\], which are not inputs"),
    ],
)
def test_profile_shape_errors(tiny, tmp_path, change, pattern):
    with pytest.raises(trt_library.ProfileError, match=pattern):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", [{**PROFILES[0], **change}], flavor="tensorrt-rtx",
                                 progress=False)


@needs_rtx
def test_profiles_must_be_a_list(tiny, tmp_path):
    with pytest.raises(trt_library.ProfileError, match="list of"):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES[0], flavor="tensorrt-rtx", progress=False)


@needs_rtx
@pytest.mark.parametrize("cc", ["9.0", "sm_100", "ampere"])
def test_unsupported_compute_capability(tiny, tmp_path, cc):
    with pytest.raises(ValueError) as err:
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES, flavor="tensorrt-rtx",
                                 compute_capabilities=[cc], progress=False)
    msg = str(err.value)
    assert "8.9" in msg and "12.0" in msg  # lists the supported ones
    assert not (tmp_path / "x.plan").exists()


@needs_rtx
def test_garbage_onnx_names_the_file(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(trt_library.EngineBuildError) as err:
        tensorrt_build.build_tensorrt_engine(garbage, tmp_path / "g.plan", [{}], flavor="tensorrt-rtx", progress=False)
    assert str(garbage) in str(err.value) and "parse" in str(err.value)
    assert not (tmp_path / "g.plan").exists()


def test_missing_onnx_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        tensorrt_build.build_tensorrt_engine(tmp_path / "nope.onnx", tmp_path / "g.plan", PROFILES, progress=False)


@needs_rtx
def test_build_time_of_tiny_engine(tiny, tmp_path):
    """Not a benchmark: keeps an eye on the CPU-only build staying in the sub-second range."""
    times = []
    for i in range(3):
        info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / f"t{i}.plan", PROFILES, flavor="tensorrt-rtx",
                                        progress=False)
        times.append(info["build_seconds"])
    print(f"\ntiny 2-profile TensorRT-RTX builds: {', '.join(f'{t:.3f}s' for t in times)}")
    assert min(times) < 30


# -------------------------------------------------------------------------------------------- GPU runtime


@gpu
@needs_cuda
def test_engine_runs_and_matches_torch(tiny, tmp_path):
    if not any(ok for ok, _ in FLAVORS.values()):
        pytest.skip(f"no TensorRT flavour importable here: {FLAVORS}")
    flavor, trt = trt_library.import_backend("auto")
    major, minor = torch.cuda.get_device_capability()
    if flavor == "tensorrt-rtx" and f"{major}.{minor}" not in trt_library.rtx_supported_compute_capabilities(trt):
        pytest.skip(f"TensorRT-RTX cannot target this GPU (sm {major}.{minor}); install full TensorRT to run here")
    engine_path = tmp_path / "run.plan"
    kwargs = {"compute_capabilities": ["current"]} if flavor == "tensorrt-rtx" else {}
    tensorrt_build.build_tensorrt_engine(tiny["onnx"], engine_path, PROFILES, flavor=flavor, progress=False, **kwargs)
    module = tiny["module"].cuda()
    with trt_runtime.TensorRTEngine(engine_path, flavor=flavor, runtime_cache_path=tmp_path / "rt.cache") as eng:
        assert eng.num_profiles == 2
        assert eng.profiles == [{k: tuple(v) for k, v in p.items()} for p in PROFILES]
        assert eng.dtypes["latents"] is torch.float16 and eng.dtypes["cap_lens"] is torch.int64
        stream = torch.cuda.Stream()
        for shapes in (PROFILES[1], PROFILES[0], PROFILES[1]):
            feeds = example_inputs(h=shapes["latents"][2], w=shapes["latents"][3], c=shapes["cap_feats"][1], device="cuda")
            binding = eng.select(shapes)
            first_ptrs = {n: t.data_ptr() for n, t in binding.tensors.items()}
            out = eng.infer(feeds, stream)["noise_pred"]
            stream.synchronize()
            with torch.no_grad():
                ref = module(*feeds.values())
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
            # persistent buffers: the same storage every call
            again = eng.infer(feeds, stream)["noise_pred"]
            assert again.data_ptr() == out.data_ptr() == first_ptrs["noise_pred"]
        # binding the persistent input buffers directly skips the copy
        bufs = eng.buffers
        bufs["latents"].copy_(feeds["latents"])
        out = eng.infer({n: bufs[n] for n in eng.input_names}, stream)
        stream.synchronize()
        with pytest.raises(trt_library.ProfileError, match="profile 0: .*latents=\\[1, 16, 16, 24\\]"):
            eng.select(profile(h=40, w=40))


@needs_rtx
def test_rtx_capabilities_are_detected_by_hasattr():
    caps = trt_library.Caps(trt_library.import_backend("tensorrt-rtx")[1])
    assert caps.compute_capability_targets and caps.runtime_cache and caps.progress_monitor
    assert caps.strongly_typed_flag is not None
    assert not caps.timing_cache  # API present but a no-op in a JIT library


@needs_rtx
def test_rtx_targets_when_this_gpu_is_unsupported(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trt_library, "current_gpu_compute_capability", lambda: "9.0")  # e.g. an H100
    with pytest.raises(ValueError, match="compute capability 9.0, which TensorRT-RTX .* cannot target"):
        tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES, flavor="tensorrt-rtx",
                                 compute_capabilities="current", progress=False)
    with caplog.at_level("WARNING"):
        info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES[:1], flavor="tensorrt-rtx",
                                        progress=False)
    assert "8.9" in info["compute_capabilities"] and "9.0" not in info["compute_capabilities"]
    assert "cannot target" in caplog.text


@needs_rtx
def test_rtx_default_targets_the_current_gpu_when_supported(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_library, "current_gpu_compute_capability", lambda: "8.9")  # e.g. an RTX 4090
    info = tensorrt_build.build_tensorrt_engine(tiny["onnx"], tmp_path / "x.plan", PROFILES[:1], flavor="tensorrt-rtx",
                                    progress=False)
    assert info["compute_capabilities"] == ["8.9"] and info["compute_capabilities_source"].startswith("current GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_engine_runtime_needs_cuda(tmp_path):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x" * 100)
    with pytest.raises(trt_library.TensorRTBackendError, match="CUDA"):
        trt_runtime.TensorRTEngine(plan)
