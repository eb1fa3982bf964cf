"""Manifests are untrusted input: schema, file names, checksums; engine selection explains refusals."""

import json
import warnings

import pytest
import torch

from zimage_trt.engines.select import EngineNotFound, Need, open_denoiser, reasons_unfit
from zimage_trt.engines.manifest import EngineShape, Manifest, ManifestError, record_file
from zimage_trt.testing.tiny import make_tiny_components


def make_manifest(folder, payload=b"engine-bytes" * 100, **overrides):
    engine = folder / "denoiser.abc.plan"
    engine.write_bytes(payload)
    fields = dict(
        name="denoiser", component="denoiser", backend="torch-compiled", backend_version=torch.__version__,
        precision="fp32", shapes=[EngineShape("256x256", 1, 64)], files=[record_file(engine)],
        compute_capabilities=[], torch_version=torch.__version__, model={"weights_fingerprint": "f" * 64},
    )
    fields.update(overrides)
    manifest = Manifest(**fields)
    return manifest, manifest.write(folder), engine


def test_round_trip(tmp_path):
    manifest, path, _ = make_manifest(tmp_path)
    again = Manifest.read(path)
    assert again.shapes == manifest.shapes and again.files == manifest.files
    again.verify_files(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["files"][0].update(name="../../etc/passwd"), "not a plain file name"),
    (lambda m: m["files"][0].update(name="/abs/engine.plan"), "not a plain file name"),
    (lambda m: m["files"][0].update(sha256="zz"), "no valid sha256"),
    (lambda m: m.update(backend="pickle"), "backend"),
    (lambda m: m.update(precision="int4"), "precision"),
    (lambda m: m.update(extra=1), "unknown manifest keys"),
    (lambda m: m.pop("shapes"), "lacks 'shapes'"),
    (lambda m: m["shapes"][0].update(width=1000), "width=1000 is not a multiple of 16"),
    (lambda m: m["shapes"][0].update(resolution="256x256"), "must have exactly width, height, batch"),
    (lambda m: m["shapes"][0].update(caption_capacity=50), "multiple of 32"),
    (lambda m: m.update(compute_capabilities=["sm90"]), "compute capability"),
    (lambda m: m.update(fp16_downscale_log2={"layers.0": [99, 0]}), "two ints"),
])
def test_schema_rejects(tmp_path, mutate, message):
    _, path, _ = make_manifest(tmp_path)
    assert_refused_once_changed(path, mutate, message)


def assert_refused_once_changed(path, mutate, message):
    """The manifest at `path`, its JSON changed by `mutate`, is refused with `message`."""
    raw = json.loads(path.read_text())
    mutate(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        Manifest.read(path)


def test_shapes_are_stored_as_width_and_height_by_name(tmp_path):
    _, path, _ = make_manifest(tmp_path, shapes=[EngineShape("384x256", 1, 64), EngineShape("256x384", 1, 64)])
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 2
    assert [(s["width"], s["height"]) for s in raw["shapes"]] == [(384, 256), (256, 384)]
    assert [s.resolution for s in Manifest.read(path).shapes] == ["384x256", "256x384"]  # WIDTHxHEIGHT


def as_format_1(path, resolutions):
    """Rewrite a manifest as engines built before sizes were WIDTHxHEIGHT wrote it ("HEIGHTxWIDTH")."""
    raw = json.loads(path.read_text())
    raw["format_version"] = 1
    raw["shapes"] = [{"resolution": r, "batch": 1, "caption_capacity": 64} for r in resolutions]
    path.write_text(json.dumps(raw))


def test_an_old_square_manifest_still_loads(tmp_path):
    _, path, _ = make_manifest(tmp_path)
    as_format_1(path, ["256x256", "512x512"])
    assert [s.resolution for s in Manifest.read(path).shapes] == ["256x256", "512x512"]  # same either way round


def test_an_old_non_square_manifest_is_refused_with_the_size_to_rebuild(tmp_path):
    _, path, _ = make_manifest(tmp_path)
    as_format_1(path, ["256x256", "768x1344"])  # format 1: 768 tall, 1344 wide
    expected = r"before sizes were written WIDTHxHEIGHT.*'768x1344' meant 768 tall and 1344 wide.*--resolution 1344x768"
    with pytest.raises(ManifestError, match=expected):
        Manifest.read(path)
    # The runtime says the same, instead of running the engine the wrong way round.
    transformer = make_tiny_components(seed=0)["transformer"]
    with pytest.raises(EngineNotFound, match=expected):
        open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1)


def test_not_json(tmp_path):
    path = tmp_path / "x.manifest.json"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        Manifest.read(path)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or replaced"),
    ("bitflip", "corrupt or swapped"),
    ("swap", "corrupt or swapped"),
    ("delete", "is missing"),
])
def test_damaged_engine_files_are_caught_before_loading(tmp_path, damage, message):
    manifest, _, engine = make_manifest(tmp_path)
    data = engine.read_bytes()
    if damage == "truncate":
        engine.write_bytes(data[:-10])
    elif damage == "bitflip":
        engine.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    elif damage == "swap":
        engine.write_bytes((b"another-engine" * 100)[: len(data)])  # same size, other content
        assert engine.stat().st_size == len(data)
    else:
        engine.unlink()
    with pytest.raises(ManifestError, match=message) as err:
        manifest.verify_files(tmp_path)
    assert engine.name in str(err.value) and "zimage-trt build" in str(err.value)


def test_reasons_for_refusing_an_engine():
    manifest = Manifest(
        name="d", component="denoiser", backend="tensorrt-rtx", backend_version="1.7", precision="fp16",
        shapes=[EngineShape("1024x1024", 1, 512)], files=[], compute_capabilities=["8.9"],
        torch_version="x", model={"weights_fingerprint": "a" * 64, "config_sha256": "c" * 64},
    )
    reasons = reasons_unfit(manifest, Need("768x1344", 1, "bf16", "9.0", "b" * 64, "d" * 64), {"torch-compiled"})
    text = "; ".join(reasons)
    for expected in ("cannot run here", "precision fp16, need bf16", "this machine is 9.0", "another model",
                     "other weights", "no shape 768x1344 batch 1 (built: 1024x1024 batch 1)"):
        assert expected in text, text


def test_open_denoiser_lists_what_was_built(tmp_path):
    transformer = make_tiny_components(seed=0)["transformer"]
    make_manifest(tmp_path, shapes=[EngineShape("512x512", 1, 64)])
    with pytest.raises(EngineNotFound) as err:
        open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1)
    assert "512x512" in str(err.value) and "zimage-trt build" in str(err.value)
    with pytest.warns(UserWarning, match="allow_fallback"):
        engine = open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1, allow_fallback=True)
    assert engine.kind == "eager"


def test_corrupt_engine_refused_by_open_denoiser(tmp_path):
    transformer = make_tiny_components(seed=0)["transformer"]
    _, _, engine = make_manifest(tmp_path)
    engine.write_bytes(engine.read_bytes()[:-1] + b"!")
    with pytest.raises(ManifestError, match="corrupt or swapped"):
        open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1)


def test_no_engine_dir_means_eager():
    transformer = make_tiny_components(seed=0)["transformer"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_denoiser(transformer, None, "cpu", torch.float32, "256x256", 1).kind == "eager"


def test_missing_engine_dir_is_named(tmp_path):
    transformer = make_tiny_components(seed=0)["transformer"]
    with pytest.raises(EngineNotFound, match="does not exist"):
        open_denoiser(transformer, tmp_path / "nowhere", "cpu", torch.float32, "256x256", 1)


def test_an_engine_is_opened_once_for_all_its_shapes(tmp_path, monkeypatch):
    from zimage_trt.engines import select as engines

    transformer = make_tiny_components(seed=0)["transformer"]
    make_manifest(tmp_path, shapes=[EngineShape("256x256", 1, 64), EngineShape("256x384", 1, 64)])
    opened = []
    monkeypatch.setattr(engines, "_open", lambda m, folder, tr, device, *rest: opened.append(m.name) or object())
    cache = {}
    first = open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1, cache=cache)
    second = open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x384", 1, cache=cache)
    assert first is second and opened == ["denoiser"]


def test_batch_rules_per_backend():
    shapes = [EngineShape("512x512", 4, 64)]
    common = dict(name="d", component="denoiser", backend_version="x", precision="fp16", shapes=shapes, files=[],
                  compute_capabilities=["9.0"], torch_version=torch.__version__, model={})
    need_one = Need("512x512", 1, "fp16", "9.0", None)
    compiled = Manifest(backend="torch-compiled", **common)
    trt = Manifest(backend="tensorrt", **common)
    assert reasons_unfit(compiled, need_one, {"torch-compiled"}) == []  # any batch up to 4
    assert any("no shape 512x512 batch 1" in r for r in reasons_unfit(trt, need_one, {"tensorrt"}))  # exact profiles


# ----------------------------------------------------------------------------- ControlNet-ready engines

def trt_manifest(folder, name, places=(), dim=64, shapes=(EngineShape("256x256", 1, 64),)):
    """A TensorRT-RTX manifest built on a CPU (so it fits this CPU machine), plain or ControlNet-ready."""
    from zimage_trt.engines import contract
    from zimage_trt.model.shapes import Resolution

    engine = folder / f"{name}.plan"
    engine.write_bytes(name.encode() * 100)
    hint_shapes = [list(contract.hint_shape(len(places), s.batch, Resolution.parse(s.resolution).latent_hw,
                                            s.caption_capacity, dim)) for s in shapes] if places else []
    manifest = Manifest(name=name, component="denoiser", backend="tensorrt-rtx", backend_version="1.7",
                        precision="fp16", shapes=list(shapes), files=[record_file(engine)], compute_capabilities=[],
                        torch_version=torch.__version__, model={}, controlnet_places=list(places),
                        controlnet_hint_shapes=hint_shapes)
    return manifest, manifest.write(folder)


def test_controlnet_fields_round_trip_and_old_manifests_read_as_plain(tmp_path):
    manifest, path = trt_manifest(tmp_path, "cn", places=(0, 1))
    again = Manifest.read(path)
    assert again.controlnet_places == [0, 1] and again.controlnet_hint_shapes == [[2, 1, 320, 64]]
    assert json.loads(path.read_text())["format_version"] == 2
    _, old, _ = make_manifest(tmp_path)  # a manifest as format 1 wrote it: neither field, version 1
    raw = json.loads(old.read_text())
    for key in ("controlnet_places", "controlnet_hint_shapes"):
        raw.pop(key)
    raw["shapes"] = [{"resolution": f"{s.pop('height')}x{s.pop('width')}", **s} for s in raw["shapes"]]
    old.write_text(json.dumps({**raw, "format_version": 1}))
    plain = Manifest.read(old)
    assert plain.controlnet_places == [] and plain.controlnet_hint_shapes == []  # (read as format 2: width, height by name)
    assert plain.shapes[0].size == manifest.shapes[0].size


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(controlnet_places=[0, 0]), "distinct main-layer indices"),
    (lambda m: m.update(controlnet_places=[0, -1]), "distinct main-layer indices"),
    (lambda m: m.update(controlnet_places=[0, True]), "distinct main-layer indices"),
    (lambda m: m.update(controlnet_places=[0, 1, 2]), r"entry \[2, 1, 320, 64\] .* = \[3, 1, 320, 64\]"),
    (lambda m: m.update(controlnet_hint_shapes=[[2, 1, 256, 64]]), r"= \[2, 1, 320, 64\]"),  # no caption rows
    (lambda m: m.update(controlnet_hint_shapes=[]), "0 entries for 1 shapes"),
    (lambda m: m.update(controlnet_hint_shapes=[[2, 1, 320]]), r"= \[2, 1, 320, 320\]"),
    (lambda m: m.update(controlnet_hint_shapes=[["x"]]), "must be"),
    (lambda m: m.update(controlnet_places=[]), "no controlnet_places"),
    (lambda m: m.update(backend="torch-compiled"), "takes ControlNet hints at run time"),
    (lambda m: m.update(format_version=1), "format-1 manifest has no ControlNet fields"),
    (lambda m: m.update(format_version=3), r"not one this version reads \[1, 2\]"),
])
def test_controlnet_schema_rejects(tmp_path, mutate, message):
    _, path = trt_manifest(tmp_path, "cn", places=(0, 1))
    assert_refused_once_changed(path, mutate, message)


def test_reasons_for_refusing_an_engine_for_a_controlnet(tmp_path):
    plain, _ = trt_manifest(tmp_path, "plain")
    ready, _ = trt_manifest(tmp_path, "ready", places=(0,))
    need = Need("256x256", 1, "fp16", None, None, controlnet_places=(0, 1))
    runnable = {"tensorrt-rtx", "torch-compiled"}
    [reason] = reasons_unfit(plain, need, runnable)
    assert "a plain engine, which takes no ControlNet hints (need places [0, 1]" in reason
    assert "--controlnet PATH" in reason and "--controlnet-places" in reason and "controlnet=" in reason
    assert reasons_unfit(ready, need, runnable) == ["ControlNet-ready for places [0], need [0, 1]"]
    assert reasons_unfit(ready, Need("256x256", 1, "fp16", None, None, controlnet_places=(0,)), runnable) == []
    assert reasons_unfit(ready, Need("256x256", 1, "fp16", None, None), runnable) == []  # serves text-to-image
    compiled = Manifest(**{**plain.__dict__, "backend": "torch-compiled"})
    assert reasons_unfit(compiled, need, runnable) == []  # takes any ControlNet's hints at run time


@pytest.fixture
def tensorrt_runnable(monkeypatch):
    """Selection as on a machine where TensorRT-RTX runs engines built on a CPU; `_open` records the choice."""
    from zimage_trt.engines import select as engines

    monkeypatch.setattr(engines, "runnable_backends", lambda device: {"tensorrt-rtx", "torch-compiled"})
    monkeypatch.setattr(engines, "flavor_versions", lambda: {})
    opened = []
    monkeypatch.setattr(engines, "_open", lambda m, *rest: opened.append(m.name) or engines.TensorRTDenoiserEngine.__new__(
        engines.TensorRTDenoiserEngine))
    return opened


def test_selection_picks_the_variant_each_request_needs(tmp_path, tensorrt_runnable):
    transformer = make_tiny_components(seed=0)["transformer"]
    trt_manifest(tmp_path, "plain")
    trt_manifest(tmp_path, "ready", places=(0, 1))
    args = (transformer, tmp_path, "cpu", torch.float16, "256x256", 1)
    open_denoiser(*args)  # text-to-image: the plain engine (no zero hints added every step)
    open_denoiser(*args, controlnet_places=[0, 1])
    assert tensorrt_runnable == ["plain", "ready"]
    (tmp_path / "plain.manifest.json").unlink()
    open_denoiser(*args)  # only the ControlNet-ready one: it serves text-to-image too
    assert tensorrt_runnable[-1] == "ready"


def test_no_engine_for_a_controlnet_says_what_was_built(tmp_path, tensorrt_runnable):
    transformer = make_tiny_components(seed=0)["transformer"]
    trt_manifest(tmp_path, "plain")
    trt_manifest(tmp_path, "ready", places=(1,))
    with pytest.raises(EngineNotFound) as err:
        open_denoiser(transformer, tmp_path, "cpu", torch.float16, "256x256", 1, controlnet_places=(0, 1))
    text = str(err.value)
    assert "taking ControlNet hints after main layers [0, 1]" in text
    assert "plain.manifest.json: a plain engine, which takes no ControlNet hints" in text
    assert "ready.manifest.json: ControlNet-ready for places [1], need [0, 1]" in text
    assert "zimage-trt build --model MODEL --resolution 256x256 --precision fp16" in text
    assert text.rstrip().endswith("--controlnet-places 0,1")
    assert tensorrt_runnable == []


def test_eager_and_compiled_engines_take_the_controlnet_places(tmp_path):
    transformer = make_tiny_components(seed=0)["transformer"]
    engine = open_denoiser(transformer, None, "cpu", torch.float32, "256x256", 1, controlnet_places=(1, 0))
    assert engine.takes_controlnet_hints and engine.denoiser.control_places == (1, 0)
    assert open_denoiser(transformer, None, "cpu", torch.float32, "256x256", 1).denoiser.control_places == ()
    with pytest.warns(UserWarning, match="allow_fallback"):
        fallback = open_denoiser(transformer, tmp_path, "cpu", torch.float32, "256x256", 1, allow_fallback=True,
                                 controlnet_places=[1])
    assert fallback.denoiser.control_places == (1,)
    with pytest.raises(ValueError, match="distinct main-layer indices"):  # a ControlNet that does not fit
        open_denoiser(transformer, None, "cpu", torch.float32, "256x256", 1, controlnet_places=(0, 7))
