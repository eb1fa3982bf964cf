"""The command line: the engine-build script, `zimage-trt build` errors, `generate`."""

import subprocess
import sys
from pathlib import Path

import pytest

from zimage_trt.cli import main
from zimage_trt.testing.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_build_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "build" / "build_engines.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--resolution" in out.stdout and "--backend" in out.stdout and "--precision" in out.stdout


def test_bad_resolution_is_a_clear_error_and_exit_code_2(tmp_path, capsys):
    code = main(["build", "--model", str(tmp_path), "--resolution", "1000x1024", "--engine-dir", str(tmp_path / "e")])
    assert code == 2
    assert "not a multiple of 16" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    code = main(["build", "--model", str(tmp_path / "missing"), "--resolution", "256x256",
                 "--backend", "tensorrt-rtx", "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_generate_with_fallback_writes_an_image(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from zimage_trt.pipeline import ZImageTRTPipeline

    model = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    target = tmp_path / "out" / "fox.png"
    with pytest.warns(UserWarning, match="allow_fallback"):
        code = main(["generate", "--model", str(model), "--engine-dir", str(tmp_path / "no-engines"), "--prompt", "a fox",
                     "--height", "256", "--width", "384", "--steps", "2", "--seed", "3", "--device", "cpu",
                     "--allow-fallback", "--output", str(target)])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(target) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (384, 256)  # (width, height) as asked
        pixels = np.asarray(image).astype(int)
    # The same request through the Python API gives the same picture. Two separate loads may round fp32
    # differently (~1e-6), which can flip a pixel across a .5 boundary: one level of 255 is allowed.
    pipe = ZImageTRTPipeline.from_pretrained(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a fox", height=256, width=384, num_inference_steps=2, guidance_scale=0.0,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert pixels.std() > 1.0  # not a flat image
    assert np.abs(pixels - np.asarray(expected).astype(int)).max() <= 1
    # And a portrait one: 256 wide, 384 tall.
    portrait = tmp_path / "out" / "tall.png"
    with pytest.warns(UserWarning, match="allow_fallback"):
        assert main(["generate", "--model", str(model), "--engine-dir", str(tmp_path / "no-engines"), "--prompt",
                     "a fox", "--width", "256", "--height", "384", "--steps", "1", "--device", "cpu",
                     "--allow-fallback", "--output", str(portrait)]) == 0
    with Image.open(portrait) as image:
        assert image.size == (256, 384)


@pytest.mark.slow  # a torch-compiled build of two shapes on the CPU: ~35 s
def test_build_then_generate_a_landscape_and_a_portrait_image(tmp_path, capsys):
    from PIL import Image

    model = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    engines = tmp_path / "engines"
    assert main(["build", "--model", str(model), "--resolution", "384x256", "--resolution", "256x384",
                 "--backend", "torch-compiled", "--caption-capacity", "64", "--out", str(engines), "--quiet"]) == 0
    listing = capsys.readouterr().out
    assert "384x256, 256x384" in listing  # the engine listing in WIDTHxHEIGHT, as typed
    for width, height in ((384, 256), (256, 384)):
        target = tmp_path / f"{width}x{height}.png"
        # No --allow-fallback: the engine built for WIDTHxHEIGHT must be the one found for width/height.
        assert main(["generate", "--model", str(model), "--engine-dir", str(engines), "--prompt", "a fox",
                     "--width", str(width), "--height", str(height), "--steps", "1", "--device", "cpu",
                     "--output", str(target)]) == 0, capsys.readouterr().err
        with Image.open(target) as image:
            assert image.format == "PNG" and image.size == (width, height)


def test_generate_image_to_image_inpainting_and_controlnet(tmp_path, capsys):
    """--image (image to image), --image --mask (inpainting), --controlnet --control-image: the same
    picture as the Python class of that task with the same arguments."""
    import numpy as np
    import torch
    from PIL import Image

    from zimage_trt import ZImageTRTControlNetPipeline, ZImageTRTInpaintPipeline
    from zimage_trt.testing.tiny import make_tiny_controlnet

    model = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    Image.new("L", (256, 256), 255).save(tmp_path / "mask.png")
    make_tiny_controlnet(seed=1, variant=None, control_in_dim=16).save_pretrained(tmp_path / "controlnet")
    common = ["generate", "--model", str(model), "--engine-dir", str(tmp_path / "none"), "--prompt", "a fox",
              "--height", "256", "--width", "256", "--steps", "2", "--device", "cpu", "--allow-fallback"]
    runs = {
        "img2img": ["--image", str(tmp_path / "photo.png"), "--strength", "0.5"],
        "inpaint": ["--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")],
        "controlnet": ["--controlnet", str(tmp_path / "controlnet"), "--control-image", str(tmp_path / "photo.png"),
                       "--control-scale", "0.5,1.0"],
    }
    for name, extra in runs.items():
        with pytest.warns(UserWarning, match="allow_fallback"):
            assert main([*common, *extra, "--output", str(tmp_path / f"{name}.png")]) == 0
    assert capsys.readouterr().out.count("wrote") == 3
    inpaint = ZImageTRTInpaintPipeline.from_pretrained(model, device="cpu")
    inpaint.set_progress_bar_config(disable=True)
    expected = inpaint("a fox", image=photo, mask_image=Image.new("L", (256, 256), 255), height=256, width=256,
                       num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    with Image.open(tmp_path / "inpaint.png") as written:
        got = np.asarray(written).astype(int)
    assert np.abs(got - np.round(expected * 255)).max() <= 1  # (two loads may round one pixel differently)
    control = ZImageTRTControlNetPipeline.from_pipe(inpaint, controlnet=tmp_path / "controlnet")
    expected = control("a fox", control_image=photo, controlnet_conditioning_scale=[0.5, 1.0], height=256, width=256,
                       num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    with Image.open(tmp_path / "controlnet.png") as written:
        assert np.abs(np.asarray(written).astype(int) - np.round(expected * 255)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--mask", "m.png"], "--mask needs --image"),
    (["--control-image", "c.png"], "--controlnet and --control-image go together"),
    (["--controlnet", "c", "--control-image", "c.png", "--control-scale", "0.5,,1"], "--control-scale '0.5,,1': write"),
])
def test_generate_refuses_task_options_that_do_not_go_together(tmp_path, capsys, extra, message):
    code = main(["generate", "--model", str(tmp_path), "--prompt", "a fox", "--device", "cpu", *extra])
    assert code == 2 and message in capsys.readouterr().err
