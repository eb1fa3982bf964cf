"""The build step: engines + manifest from weights, atomic on failure, clear errors on bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zimage_trt import build_engines
from zimage_trt.compiler import tensorrt_build
from zimage_trt.compiler.build import resolve_backend
from zimage_trt.engines.manifest import Manifest
from zimage_trt.testing.tiny import make_tiny_components, save_tiny_pipeline


def _rtx_unavailable():
    """Why build_engines cannot use TensorRT-RTX here (the library's own check), or None when it can."""
    try:
        resolve_backend("tensorrt-rtx", torch.device("cpu"))
    except RuntimeError as error:
        return str(error)
    return None


# Only the tests that build with TensorRT-RTX need it; CI installs tensorrt-rtx-cu13, so a skip there fails CI.
RTX_UNAVAILABLE = _rtx_unavailable()
needs_rtx = pytest.mark.skipif(RTX_UNAVAILABLE is not None, reason=f"CI installs tensorrt-rtx-cu13: {RTX_UNAVAILABLE}")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny", seed=11)


@needs_rtx
def test_tensorrt_rtx_engine_with_two_resolutions_in_one_file(tiny_folder, tmp_path):
    result = build_engines(tiny_folder, ["256x256", "256x384"], tmp_path, backend="tensorrt-rtx",
                           precision="fp16", caption_capacity=64, progress=False)
    m = result.manifest
    assert m.backend == "tensorrt-rtx" and m.precision == "fp16"
    assert [s.resolution for s in m.shapes] == ["256x256", "256x384"]
    assert len(m.files) == 1, "one engine file holds every resolution (weights stored once)"
    engine = tmp_path / m.files[0].name
    assert engine.stat().st_size > 100_000
    assert engine.read_bytes()[:4] == b"vtrt"  # a serialized TensorRT-RTX engine
    assert m.compute_capabilities and m.onnx_sha256 and m.model["weights_fingerprint"]
    Manifest.read(result.manifest_path).verify_files(tmp_path)
    info = result.details["engine"]
    assert len(info["profiles"]) == 2
    assert info["strongly_typed"]


@pytest.mark.slow
@needs_rtx
def test_rebuild_replaces_engine_and_removes_the_old_file(tiny_folder, tmp_path):
    first = build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                          progress=False)
    second = build_engines(tiny_folder, "256x384", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                           progress=False)
    assert first.manifest.files[0].name != second.manifest.files[0].name
    assert not (tmp_path / first.manifest.files[0].name).exists()
    assert Manifest.read(second.manifest_path).shapes[0].resolution == "256x384"


@pytest.mark.slow
def test_torch_compiled_engine_runs_in_a_fresh_process(tmp_path):
    """The PyTorch-native format, built on the CPU, loads its persisted artefacts in a new process and
    computes what the eager static denoiser computes."""
    transformer = make_tiny_components(seed=4)["transformer"]
    folder = tmp_path / "model"
    transformer.save_pretrained(folder / "transformer")
    result = build_engines(folder, "256x256", tmp_path / "engines", backend="torch-compiled", precision="fp32",
                           caption_capacity=64, progress=False)
    assert result.manifest.compute_capabilities == []  # built on a CPU
    script = textwrap.dedent(f"""
        import torch
        from zimage_trt import open_denoiser, StaticZImageDenoiser
        from zimage_trt.model.weights import load_transformer
        tr = load_transformer({str(folder)!r})
        engine = open_denoiser(tr, {str(tmp_path / 'engines')!r}, 'cpu', torch.float32, '256x256', 1)
        assert engine.kind == 'torch-compiled', engine.kind
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(1, 16, 32, 32, generator=g), torch.tensor([0.3])
        c, n = torch.randn(1, 64, 32, generator=g), torch.tensor([50])
        with torch.no_grad():
            got = engine.run(x, t, c, n, masked=True)
            want = StaticZImageDenoiser(tr)(x, t, c, n)
        print('MAXDIFF', float((got - want).abs().max() / want.abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("MAXDIFF")[1])
    assert diff <= 1e-5


@pytest.mark.slow
def test_vae_decoder_kernels_travel_with_the_engine(tmp_path):
    """Built with a VAE, a fresh process (empty compiler caches) that loads the engine compiles the
    pipeline's VAE decoder and encoder from the stored artefacts: cache hits only, no kernel compiled anew."""
    parts = make_tiny_components(seed=6)
    parts["vae"].save_pretrained(tmp_path / "vae")
    result = build_engines(parts["transformer"], "256x256", tmp_path / "engines", backend="torch-compiled",
                           precision="fp32", caption_capacity=64, progress=False, vae=parts["vae"])
    assert result.details["vae_decoder_compiled"] is True
    artefacts = result.manifest.file_path(tmp_path / "engines", result.manifest.files[0])
    script = textwrap.dedent(f"""
        import torch
        from diffusers import AutoencoderKL
        from zimage_trt.engines import torch_compiled
        from torch._dynamo.utils import counters
        torch_compiled.load_artifacts(open({str(artefacts)!r}, 'rb').read())
        vae = AutoencoderKL.from_pretrained({str(tmp_path / 'vae')!r})
        torch_compiled.compile_vae_decoder(vae)
        torch_compiled.compile_vae_encoder(vae)  # (the image tasks' encoder: in the artefacts too)
        with torch.no_grad():
            vae.decode(torch.randn(1, 16, 32, 32), return_dict=False)
            vae.encode((torch.rand(1, 3, 256, 256) * 2 - 1).contiguous(memory_format=torch.channels_last))
        print('HITS', counters['inductor']['fxgraph_cache_hit'], 'MISSES', counters['inductor']['fxgraph_cache_miss'])
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    hits, misses = (int(v) for v in out.stdout.split("HITS")[1].split("MISSES"))
    assert hits >= 2 and misses == 0, out.stdout


def test_build_keeps_no_copy_of_the_weights_alive(tmp_path, monkeypatch):
    """Building from an in-memory model copies it; once the build returns, nothing may hold that copy
    (on the GPU it is a second 11.5 GiB of weights: dynamo's caches used to keep it)."""
    import copy
    import weakref

    from zimage_trt.compiler import build as build_module

    copies, deepcopy = [], copy.deepcopy

    def tracked_deepcopy(obj, *args):
        made = deepcopy(obj, *args)
        if isinstance(made, torch.nn.Module):
            copies.extend(weakref.ref(p) for p in [made, *made.parameters()])
        return made

    monkeypatch.setattr(build_module.copy, "deepcopy", tracked_deepcopy)
    transformer = make_tiny_components(seed=5)["transformer"]
    build_engines(transformer, "256x256", tmp_path, backend="torch-compiled", precision="fp32", caption_capacity=64,
                  progress=False)
    # No gc.collect() here: the copy sits in reference cycles, and a copy that has lived through a build
    # is in the oldest GC generation, which Python may not collect for a long time. The build must.
    assert copies, "the build did not copy the model (the test no longer checks anything)"
    alive = sum(ref() is not None for ref in copies)
    assert alive == 0, f"{alive} of the build's copied transformer and its {len(copies) - 1} weights are still alive"


@pytest.mark.parametrize("resolution, message", [
    ("1000x1024", "not a multiple of 16"),
    ("0x256", "must be a positive multiple of 16"),
    ("big", "cannot read size .big.: write WIDTHxHEIGHT"),
])
def test_bad_resolutions(tiny_folder, tmp_path, resolution, message):
    with pytest.raises(ValueError, match=message):
        build_engines(tiny_folder, resolution, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_resolution_past_the_rope_table_is_refused_before_any_engine(tiny_folder, tmp_path):
    # The tiny model's tables hold 512 tokens a side (8192 px), as Z-Image-Turbo's do.
    with pytest.raises(ValueError, match=r"width=8208 is 513 image tokens.*axes_lens\[2\]=512.*at most 8192 pixels"):
        build_engines(tiny_folder, "8208x256", tmp_path, backend="torch-compiled", progress=False)  # WIDTHxHEIGHT
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


@needs_rtx
def test_tensorrt_engines_start_at_128_px(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match=r"tensorrt-rtx engines need sides of at least 128 px.*\['112x256'\].*torch-compiled"):
        build_engines(tiny_folder, ["112x256", "256x256"], tmp_path, backend="tensorrt-rtx", progress=False)
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_unknown_and_uninstalled_backends():
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("onnxruntime", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="tensorrt-rtx: available"):
        resolve_backend("tensorrt", torch.device("cpu"))  # full TensorRT is not installable here


@needs_rtx
def test_missing_weight_file_is_named(tiny_folder, tmp_path):
    import shutil

    from zimage_trt.model.weights import WeightsError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(WeightsError, match=r"transformer: no diffusion_pytorch_model\.safetensors or "
                                           r"diffusion_pytorch_model\.safetensors\.index\.json found") as err:
        build_engines(broken, "256x256", tmp_path / "out", backend="tensorrt-rtx", progress=False)
    assert str(broken / "transformer") in str(err.value)  # names the folder it looked in
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []  # nothing built


@pytest.mark.slow
@needs_rtx
def test_interrupted_build_keeps_previous_engine(tiny_folder, tmp_path, monkeypatch):
    good = build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                         progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def interrupted(*args, **kwargs):
        with open(args[1], "wb") as f:  # half an engine written, then Ctrl-C
            f.write(b"vtrt-partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tensorrt_build, "build_tensorrt_engine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_engines(tiny_folder, "256x384", tmp_path, backend="tensorrt-rtx", caption_capacity=32, progress=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "an interrupted build must leave the previous engine and manifest as they were"
    Manifest.read(good.manifest_path).verify_files(tmp_path)


def test_read_only_engine_dir(tiny_folder, tmp_path, monkeypatch):
    # CI runs as root, which ignores permission bits: make the write probe fail as a read-only mount would.
    from zimage_trt import files

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match="cannot write engines"):
        build_engines(tiny_folder, "256x256", tmp_path / "sub", progress=False)


def test_engine_dir_that_is_a_file(tiny_folder, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PermissionError, match="cannot write engines"):
        build_engines(tiny_folder, "256x256", target, progress=False)
    assert target.read_text() == "x"


@pytest.mark.slow
@needs_rtx
def test_sigkilled_build_leaves_previous_engine_and_next_build_cleans_up(tiny_folder, tmp_path):
    good = build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                         progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    killed = textwrap.dedent(f"""
        import os, signal
        from zimage_trt import build_engines
        from zimage_trt.compiler import tensorrt_build

        def dies_half_way(onnx, engine_path, *args, **kwargs):
            with open(engine_path, "wb") as f:
                f.write(b"vtrt-half-an-engine")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        tensorrt_build.build_tensorrt_engine = dies_half_way
        build_engines({str(tiny_folder)!r}, "256x384", {str(tmp_path)!r}, backend="tensorrt-rtx",
                      caption_capacity=32, progress=False)
    """)
    out = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=600)
    assert out.returncode == -9, out.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert leftovers, "the kill should have happened mid-write"
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before}
    assert after == before, "SIGKILL must leave the previous engine and manifest untouched"
    Manifest.read(good.manifest_path).verify_files(tmp_path)
    build_engines(tiny_folder, "256x384", tmp_path, backend="tensorrt-rtx", caption_capacity=32, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")], "stale temporary files removed"


@pytest.mark.slow
@needs_rtx
def test_disk_full_leaves_nothing_half_written(tiny_folder, tmp_path, monkeypatch):
    import errno

    good = build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                         progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    def disk_full(onnx, engine_path, *args, **kwargs):
        with open(engine_path, "wb") as f:
            f.write(b"vtrt-some-bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorrt_build, "build_tensorrt_engine", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_engines(tiny_folder, "256x384", tmp_path, backend="tensorrt-rtx", caption_capacity=32, progress=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    Manifest.read(good.manifest_path).verify_files(tmp_path)


@needs_rtx
def test_concurrent_builds_of_one_engine_are_refused(tiny_folder, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".denoiser-tensorrt-rtx-fp16.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build holds it
        with pytest.raises(RuntimeError, match="another build"):
            build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", progress=False)


def test_pipeline_refuses_an_engine_built_from_other_weights(tmp_path):
    """An engine is matched to the weights it was built from (fingerprint of the safetensors files)."""
    from zimage_trt.engines.select import EngineNotFound
    from zimage_trt.pipeline import ZImageTRTPipeline

    built_from = save_tiny_pipeline(tmp_path / "a", seed=1)
    other = save_tiny_pipeline(tmp_path / "b", seed=2)
    build_engines(built_from, "256x256", tmp_path / "engines", backend="torch-compiled", precision="fp32",
                  caption_capacity=64, progress=False)
    pipe = ZImageTRTPipeline.from_pretrained(other, engine_dir=tmp_path / "engines", device="cpu")
    with pytest.raises(EngineNotFound, match="other weights"):
        pipe("a fox", height=256, width=256, num_inference_steps=1)
    same = ZImageTRTPipeline.from_pretrained(built_from, engine_dir=tmp_path / "engines", device="cpu")
    same.set_progress_bar_config(disable=True)
    latents = same("a fox", height=256, width=256, num_inference_steps=1, output_type="latent").images
    assert torch.isfinite(latents).all()
    assert {loop.engine.kind for loop in same._loops.values()} == {"torch-compiled"}
