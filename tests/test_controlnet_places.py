"""The build option for ControlNet-ready engines: where the control places come from (given, a loaded
ZImageControlNetModel, its diffusers folder, one .safetensors file through diffusers' loader), what is
refused and how, and what the option means for each backend. The real TensorRT-RTX build of the variant:
tests/test_tensorrt_controlnet_build.py."""

import json

import pytest
import torch
from diffusers import ZImageControlNetModel
from safetensors.torch import save_file

from zimage_trt import cli
from zimage_trt.compiler import build
from zimage_trt.compiler.build import build_engines
from zimage_trt.compiler.controlnet_places import control_places_of, parse_places
from zimage_trt.engines.manifest import Manifest
from zimage_trt.model.weights import WeightsError
from zimage_trt.testing.tiny import make_tiny_components, save_tiny_pipeline


def tiny_controlnet(places=(0, 1)):
    """A tiny Union-2.x-layout ZImageControlNetModel (a control noise refiner) fitting the tiny transformer."""
    torch.manual_seed(0)
    return ZImageControlNetModel(control_layers_places=list(places), control_refiner_layers_places=[0],
                                 control_in_dim=16, add_control_noise_refiner="control_noise_refiner", dim=64,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2)


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet") / "controlnet"
    tiny_controlnet().save_pretrained(folder)
    return folder


def test_places_given_parsed_or_from_a_loaded_controlnet():
    assert control_places_of(None) == ()
    assert control_places_of([0, 2, 4]) == (0, 2, 4) and control_places_of("0, 2,4") == (0, 2, 4)
    assert parse_places("28,0") == (28, 0)
    assert control_places_of(tiny_controlnet((1, 0))) == (1, 0)
    for bad in ("", "0,,2", "0;2", "-1", "a"):
        with pytest.raises(ValueError, match="write main-layer indices separated by commas"):
            parse_places(bad)
    with pytest.raises(TypeError, match="a ZImageControlNetModel, a diffusers-format folder"):
        control_places_of(3.5)


def test_places_from_a_diffusers_folder(controlnet_folder):
    assert control_places_of(controlnet_folder) == (0, 1)
    assert control_places_of(controlnet_folder.parent) == (0, 1)  # a pipeline folder's controlnet/
    config = json.loads((controlnet_folder / "config.json").read_text())
    other = controlnet_folder.parent / "not-a-controlnet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "ZImageTransformer2DModel"}))
    with pytest.raises(WeightsError, match="describes a ZImageTransformer2DModel, not a ZImageControlNetModel"):
        control_places_of(other)
    with pytest.raises(WeightsError, match="no config.json"):
        control_places_of(controlnet_folder.parent.parent)


def test_places_from_one_safetensors_file_through_diffusers_loader(controlnet_folder, tmp_path):
    """diffusers' loader recognises the checkpoint by its keys; the places come from its config (here a
    folder given as config=; by default the layout's hub config, which offline cannot be read: said so)."""
    state = tiny_controlnet().state_dict()
    file = tmp_path / "union.safetensors"
    save_file(state, file)
    assert control_places_of(file, config=controlnet_folder) == (0, 1)
    with pytest.raises(WeightsError, match=r"diffusers reads it as 'z-image-turbo-controlnet', whose config is "
                                           r"'hlky/Z-Image-Turbo-Fun-Controlnet-Union'.*--controlnet-places"):
        control_places_of(file)  # (the tests run with HF_HUB_OFFLINE=1)
    three = controlnet_folder.parent / "three"
    tiny_controlnet((0, 1, 2)).save_pretrained(three)
    with pytest.raises(WeightsError, match=r"holds 2 control layers but .* lists 3 places \[0, 1, 2\]"):
        control_places_of(file, config=three)
    transformer = tmp_path / "transformer.safetensors"
    save_file(make_tiny_components(seed=0)["transformer"].state_dict(), transformer)
    with pytest.raises(WeightsError, match="not a Z-Image ControlNet checkpoint"):
        control_places_of(transformer, config=controlnet_folder)


def test_pickles_and_other_files_are_refused_unread(tmp_path):
    pickle = tmp_path / "union.pth"
    pickle.write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(WeightsError, match="a pickle checkpoint, never unpickled"):
        control_places_of(pickle)
    text = tmp_path / "x.txt"
    text.write_text("x")
    with pytest.raises(WeightsError, match=r"not a \.safetensors file \(\.txt\)"):
        control_places_of(text)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        control_places_of(broken)
    with pytest.raises(WeightsError, match="no such file or folder"):
        control_places_of(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny", seed=11)


def test_places_that_do_not_fit_the_model_are_refused_before_any_engine(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match=r"control places \[0, 5\] must be distinct main-layer indices in 0..1"):
        build_engines(tiny_folder, "256x256", tmp_path, backend="tensorrt-rtx", caption_capacity=32,
                      controlnet=[0, 5], progress=False)
    assert not list(tmp_path.glob("*.manifest.json")) and not list(tmp_path.glob("*.plan"))


def test_torch_compiled_build_checks_the_option_and_records_no_variant(tiny_folder, tmp_path, monkeypatch):
    """A torch-compiled engine takes any ControlNet's hints at run time: the option is checked against the
    model and changes nothing (the compile itself is stood in for; test_build.py runs real ones)."""
    seen = []

    def compile_stand_in(denoiser, shapes, out_dir, name, device, vae, progress):
        seen.append(denoiser.control_places)
        path = out_dir / f"{name}.artifacts"
        path.write_bytes(b"compiled")
        return [path], torch.__version__, []

    monkeypatch.setattr(build, "_build_torch_compiled", compile_stand_in)
    result = build_engines(tiny_folder, "256x256", tmp_path, backend="torch-compiled", caption_capacity=32,
                           controlnet=[1, 0], progress=False, vae=False)
    assert seen == [()]  # compiled as the plain engine it is
    manifest = Manifest.read(result.manifest_path)
    assert manifest.name == "denoiser-torch-compiled-fp32" and manifest.controlnet_places == []
    assert "take any ControlNet's hints at run time" in result.details["controlnet"]
    with pytest.raises(ValueError, match="distinct main-layer indices"):
        build_engines(tiny_folder, "256x256", tmp_path, backend="torch-compiled", caption_capacity=32,
                      controlnet=[0, 9], progress=False, vae=False)


def test_cli_options(tiny_folder, controlnet_folder, tmp_path, capsys):
    args = ["build", "--model", str(tiny_folder), "--resolution", "256x256", "--backend", "tensorrt-rtx",
            "--caption-capacity", "32", "--out", str(tmp_path), "--quiet"]
    assert cli.main([*args, "--controlnet-places", "0,9"]) == 2
    assert "control places [0, 9] must be distinct main-layer indices" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--controlnet-places", "0,1", "--controlnet", str(controlnet_folder)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main([*args, "--controlnet", str(tmp_path / "union.bin")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
