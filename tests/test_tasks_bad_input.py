"""Bad input to the task classes: a clear error naming what was wrong and what is allowed, raised before
any work, and the pipeline serves the next call as before."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_trt import (
    ZImageTRTControlNetInpaintPipeline,
    ZImageTRTControlNetPipeline,
    ZImageTRTImg2ImgPipeline,
    ZImageTRTInpaintPipeline,
    ZImageTRTPipeline,
)
from zimage_trt.model.controlnet import ControlNetMismatch
from zimage_trt.testing.tiny import make_tiny_controlnet, save_tiny_pipeline

SIZE = 256
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def picture(size=(SIZE, SIZE), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size=(SIZE, SIZE)):
    return Image.new("L", size, 255)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)
    base = ZImageTRTPipeline.from_pretrained(path, device="cpu", torch_dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    net16 = make_tiny_controlnet(seed=1, variant=None, control_in_dim=16)
    net33 = make_tiny_controlnet(seed=2, variant="control_noise_refiner", control_in_dim=33)
    yield {
        "img2img": ZImageTRTImg2ImgPipeline.from_pipe(base),
        "inpaint": ZImageTRTInpaintPipeline.from_pipe(base),
        "controlnet": ZImageTRTControlNetPipeline.from_pipe(base, controlnet=net33),
        "controlnet_inpaint": ZImageTRTControlNetInpaintPipeline.from_pipe(base, controlnet=net33),
        "net16": net16,
    }
    base.close()


GOOD = {
    "img2img": dict(image=picture()),
    "inpaint": dict(image=picture(), mask_image=mask()),
    "controlnet": dict(control_image=picture(), height=SIZE, width=SIZE),
    "controlnet_inpaint": dict(image=picture(), mask_image=mask(), control_image=picture(), height=SIZE, width=SIZE),
}

LATENT = (16, SIZE // 8, SIZE // 8)
BAD = [
    ("img2img", dict(strength=1.5), ValueError, r"strength must be in \[0.0, 1.0\].*got 1.5"),
    ("img2img", dict(strength=-0.1), ValueError, r"strength must be in \[0.0, 1.0\]"),
    ("img2img", dict(strength="high"), TypeError, "strength must be a number"),
    ("img2img", dict(strength=0.0), ValueError, r"strength=0.0 with 2 steps leaves 0 denoising steps: strength 0 keeps the image as it is"),
    ("img2img", dict(image="photo.png"), TypeError, "image must be a PIL image, a numpy array or a torch tensor, got str"),
    ("img2img", dict(image=None), ValueError, "image is required"),
    ("img2img", dict(image=[picture(), picture(), picture()], num_images_per_prompt=2), ValueError,
     "image has 3 images for 2 images to make"),
    ("img2img", dict(image=np.full((SIZE, SIZE, 3), np.nan, dtype=np.float32)), ValueError, "image contains NaN"),
    ("img2img", dict(mask_image=mask()), TypeError, "unexpected keyword argument 'mask_image'"),
    # Latents as image (diffusers takes them as they are): of the latent size of height x width, checked first.
    ("img2img", dict(image=torch.zeros(1, 16, 16, 16), height=SIZE, width=SIZE), ValueError,
     r"image is latents of shape \(1, 16, 16, 16\).*height x width 256x256 has latents of 32x32"),
    ("img2img", dict(image=torch.zeros(1, 16, 33, 32)), ValueError,
     r"image is latents of shape \(1, 16, 33, 32\).*height x width 264x256 has latents of 32x32"),
    ("img2img", dict(image=[torch.zeros(16, 32, 32), torch.zeros(16, 16, 16)]), ValueError,
     "image is a list of latent tensors of different shapes"),
    ("inpaint", dict(image=torch.zeros(1, 16, 16, 16), height=SIZE, width=SIZE), ValueError,
     r"image is latents of shape \(1, 16, 16, 16\)"),
    ("inpaint", dict(mask_image=mask((SIZE, 128))), ValueError,
     r"mask_image is 256x128 \(WIDTHxHEIGHT\) but image is 256x256"),
    ("inpaint", dict(mask_image=None), ValueError, "mask_image is required"),
    ("inpaint", dict(mask_image=42), TypeError, "mask_image must be a PIL image"),
    ("inpaint", dict(masked_image_latents=torch.full((1, *LATENT), float("nan"))), ValueError,
     "masked_image_latents contains NaN"),
    ("inpaint", dict(masked_image_latents=torch.zeros(1, 4, 32, 32)), ValueError,
     r"masked_image_latents has shape \(1, 4, 32, 32\), expected \[images, 16, 32, 32\]"),
    ("inpaint", dict(masked_image_latents=[1, 2]), TypeError, "masked_image_latents must be a floating-point"),
    ("controlnet", dict(control_image=None), ValueError, "control_image is required"),
    ("controlnet", dict(control_image=b"\x89PNG"), TypeError, "control_image must be a PIL image"),
    ("controlnet", dict(controlnet_conditioning_scale=[1.0, 0.5]), ValueError,
     r"takes one number or 3: one per control place, the noise-refiner places \[0\] first, then the layer places \[0, 1\]"),
    ("controlnet", dict(controlnet_conditioning_scale=float("nan")), ValueError, "must be a finite number"),
    ("controlnet", dict(control_image=torch.zeros(1, 3, 128, 128)), ValueError,
     r"control_image is a tensor of 128x128 \(WIDTHxHEIGHT\), taken as it is; width x height is 256x256"),
    # Sizes by text to image's rule, before any image is resized to them (200 never becomes 192).
    ("controlnet", dict(height=200), ValueError, "height=200 is not a multiple of 16 pixels.*use 192 or 208"),
    ("controlnet", dict(width=1024.9), TypeError, "width must be an int number of pixels, got float 1024.9"),
    ("controlnet_inpaint", dict(height=200), ValueError, "height=200 is not a multiple of 16 pixels"),
    ("img2img", dict(height=1024.9), TypeError, "height must be an int number of pixels, got float 1024.9"),
    ("img2img", dict(width=200), ValueError, "width=200 is not a multiple of 16 pixels"),
    ("inpaint", dict(width=256.0), TypeError, "width must be an int number of pixels, got float 256.0"),
    ("controlnet_inpaint", dict(mask_image=mask((128, 128))), ValueError, "mask_image is 128x128"),
    ("controlnet_inpaint", dict(image=None), ValueError, "image is required"),
]


@pytest.mark.parametrize("task, change, error, message", BAD, ids=[f"{t}-{'-'.join(c)}" for t, c, _, _ in BAD])
def test_bad_input_is_refused_clearly_and_the_pipeline_works_after(pipes, task, change, error, message):
    pipe = pipes[task]
    call = dict(prompt="a fox", num_inference_steps=2, output_type="latent", **GOOD[task])
    with pytest.raises(error, match=message):
        pipe(**{**call, **change})
    out = pipe(generator=torch.Generator().manual_seed(0), **call)
    assert torch.isfinite(out.images).all()


def test_a_controlnet_that_does_not_fit_the_transformer_is_refused(pipes):
    from diffusers import ZImageControlNetModel

    from zimage_trt.testing.tiny import tiny_controlnet_config

    wide = ZImageControlNetModel(**tiny_controlnet_config(None, 16, dim=128, n_heads=4, n_kv_heads=4))
    with pytest.raises(ControlNetMismatch, match="dim 128 vs the transformer's 64; n_heads 4 vs the transformer's 2"):
        ZImageTRTControlNetPipeline.from_pipe(pipes["img2img"], controlnet=wide)
    deep = ZImageControlNetModel(**tiny_controlnet_config(None, 16, control_layers_places=[0, 5]))
    with pytest.raises(ControlNetMismatch, match=r"control_layers_places \[0, 5\] are not distinct main-layer "
                                                 r"indices of the transformer's 2 layers"):
        ZImageTRTControlNetPipeline.from_pipe(pipes["img2img"], controlnet=deep)


def test_inpainting_needs_an_inpaint_capable_controlnet(pipes):
    pipe = ZImageTRTControlNetInpaintPipeline.from_pipe(pipes["img2img"], controlnet=pipes["net16"])
    with pytest.raises(ValueError, match="takes 16 control channels; inpainting needs an inpaint-capable one with 33"):
        pipe("a fox", num_inference_steps=2, **GOOD["controlnet_inpaint"])


def test_a_controlnet_pipeline_without_a_controlnet_or_with_a_wrong_one(pipes, tmp_path):
    with pytest.raises(ValueError, match="needs controlnet="):
        ZImageTRTControlNetPipeline.from_pipe(pipes["img2img"])
    with pytest.raises(TypeError, match="controlnet must be a ZImageControlNetModel, a folder"):
        ZImageTRTControlNetPipeline.from_pipe(pipes["img2img"], controlnet=3)
    (tmp_path / "net.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a .safetensors file"):
        ZImageTRTControlNetPipeline.from_pipe(pipes["img2img"], controlnet=tmp_path / "net.ckpt")


@pytest.mark.parametrize("task", ["controlnet", "controlnet_inpaint"])
def test_an_engine_that_cannot_run_a_controlnet_is_refused_before_any_encoding(pipes, task, monkeypatch):
    """What the loop asks of its engine (`runs_controlnet`), asked before the text and VAE encoders run."""
    pipe = type(pipes[task]).from_pipe(pipes[task])
    plain = SimpleNamespace(kind="tensorrt", runs_controlnet=False)
    monkeypatch.setattr(pipe, "denoise_loop", lambda resolution, images, cfg: SimpleNamespace(engine=plain))
    encoded = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *args, **kwargs: encoded.append("text"))
    monkeypatch.setattr(pipe.vae, "encode", lambda *args, **kwargs: encoded.append("image"))
    with pytest.raises(ValueError, match="this tensorrt engine cannot run a ControlNet inside its step"):
        pipe(prompt="a fox", num_inference_steps=2, output_type="latent", **GOOD[task])
    assert encoded == []


def test_positional_arguments_mean_what_they_mean_in_diffusers(pipes):
    """(prompt, height, width, num_inference_steps, sigmas, guidance_scale, control_image, ...), as
    diffusers' ZImageControlNetPipeline; an argument given twice or an unknown one is a TypeError."""
    pipe = pipes["controlnet"]
    control = picture(seed=4)
    by_name = pipe(prompt="a fox", height=SIZE, width=SIZE, num_inference_steps=2, control_image=control,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    in_order = pipe("a fox", SIZE, SIZE, 2, None, 0.0, control, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(by_name, in_order)
    with pytest.raises(TypeError, match="multiple values for argument 'height'"):
        pipe("a fox", SIZE, height=SIZE, control_image=control)
    with pytest.raises(TypeError, match=r"ZImageTRTControlNetPipeline.__call__: .*'strength'.*it takes \['prompt'"):
        pipe("a fox", control_image=control, strength=0.5)
