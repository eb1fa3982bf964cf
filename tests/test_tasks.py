"""The four task classes against diffusers' classes of the same task, on the same tiny random weights and
seed (CPU, fp32, offline): the same images within 1/255 per pixel (the same maths by two code paths).

Covered per class: strength 1.0 and a strength that leaves a single step, soft-edged masks (diffusers'
mask processor binarises them: so do we), conditioning scale 0 and a list of scales, guidance > 0 with a
negative prompt, several images per prompt, a plain (16-channel, Union v1) and an inpaint-capable
(33-channel, Union 2.1) ControlNet; through the eager engine, and (slow) through a torch-compiled one.
"""

import copy

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
from zimage_trt import pipeline as pipeline_module
from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.shapes import Resolution
from zimage_trt.testing.tiny import make_tiny_controlnet, save_tiny_pipeline

from test_lora import make_lora

STEPS = 4
PIXEL_TOLERANCE = 1.0 / 255.0
SIZE = 256

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def picture(seed, size=(SIZE, SIZE)):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)  # blocks: image-like, not noise
    return Image.fromarray(low).resize(size, Image.BILINEAR)


def soft_mask(size=(SIZE, SIZE)):
    """A horizontal ramp (0 at the left, 255 at the right): a soft edge across the middle."""
    ramp = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
    return Image.fromarray(ramp, mode="L")


class PerPlace:
    """Stands in for diffusers' float `conditioning_scale`: diffusers multiplies each hint by it in the
    order it makes them (noise-refiner places, then layer places); this hands out our list in turn, so
    diffusers' own ControlNet gives the reference for a list of scales (diffusers 0.42 fails on a list)."""

    def __init__(self, values):
        self.values, self.index = list(values), 0

    def __rmul__(self, hint):
        value = self.values[self.index % len(self.values)]
        self.index += 1
        return hint * value


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def controlnets():
    return {"v1-16": make_tiny_controlnet(seed=7, variant=None, control_in_dim=16),
            "2.1-33": make_tiny_controlnet(seed=8, variant="control_noise_refiner", control_in_dim=33)}


@pytest.fixture(scope="module")
def base(tiny_path):
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference_parts(tiny_path):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(tiny_path).components


def reference(name, parts, controlnet=None):
    import diffusers

    cls = getattr(diffusers, name)
    pipe = cls(**parts) if controlnet is None else cls(**parts, controlnet=copy.deepcopy(controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(ours, theirs, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 0.0, **kwargs}
    seed = kwargs.pop("seed", 0)
    overrides = kwargs.pop("reference_overrides", {})
    # (diffusers rewrites a prompt list in place: it gets copies)
    ref_kwargs = {k: (list(v) if isinstance(v, list) and k in ("prompt", "negative_prompt") else v)
                  for k, v in kwargs.items()}
    ref_kwargs.update(overrides)
    expected = theirs(output_type="np", generator=torch.Generator().manual_seed(seed), **ref_kwargs).images
    got = ours(output_type="np", generator=torch.Generator().manual_seed(seed), **kwargs)
    assert got.images.shape == expected.shape
    worst = float(np.abs(got.images - expected).max())
    assert worst <= PIXEL_TOLERANCE, f"max pixel difference {worst * 255:.3f}/255"
    return got


IMG2IMG_CASES = {
    "strength_1": dict(prompt="a red fox", image=picture(1), strength=1.0),
    "single_step": dict(prompt="a red fox", image=picture(1), strength=0.25),  # int(4 - 1) = 3: one step left
    "default_strength_cfg_two_prompts_two_each": dict(
        prompt=["a red fox", "a lighthouse"], negative_prompt=["blurry", "dark"], image=picture(2),
        guidance_scale=2.5, num_images_per_prompt=2),
    "two_images_tiled_over_the_batch": dict(prompt="a red fox", image=[picture(3), picture(4)],
                                            num_images_per_prompt=4, strength=0.5),
}


@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_img2img_matches_diffusers(base, reference_parts, case):
    ours = ZImageTRTImg2ImgPipeline.from_pipe(base)
    out = run_both(ours, reference("ZImageImg2ImgPipeline", reference_parts), **IMG2IMG_CASES[case])
    strength = IMG2IMG_CASES[case].get("strength", 0.6)
    assert ours.num_timesteps == STEPS - int(STEPS - STEPS * strength) and out.timings.task == "image-to-image"


def test_img2img_resizes_an_image_of_another_size_as_the_image_processor_would(base, reference_parts):
    """diffusers 0.42 fails on an image whose size is not height x width; we resize it with its processor."""
    ours = ZImageTRTImg2ImgPipeline.from_pipe(base)
    photo = picture(5, size=(320, 200))
    resized = ours.image_processor.resize(photo, SIZE, SIZE)
    run_both(ours, reference("ZImageImg2ImgPipeline", reference_parts), prompt="a fox", image=photo,
             height=SIZE, width=SIZE, reference_overrides={"image": resized})


def test_img2img_and_inpaint_take_latents_as_image_as_diffusers(base, reference_parts):
    """A tensor with the latent channels is the image's latents, taken as they are (diffusers); height and
    width default to their size (8 pixels a latent row), where diffusers 0.42 needs them given."""
    latents = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(9))
    ours = ZImageTRTImg2ImgPipeline.from_pipe(base)
    out = run_both(ours, reference("ZImageImg2ImgPipeline", reference_parts), prompt="a fox", image=latents,
                   strength=0.5, height=SIZE, width=SIZE)
    derived = ours("a fox", image=latents, strength=0.5, num_inference_steps=STEPS, output_type="np",
                   generator=torch.Generator().manual_seed(0))
    assert np.array_equal(derived.images, out.images)
    # diffusers 0.42's inpaint encodes the image again for its masked latents and fails on latents; ours
    # takes them as image to image does, and a mask that keeps everything gives them back.
    inpaint = ZImageTRTInpaintPipeline.from_pipe(base)
    kept = inpaint("a door", image=latents, mask_image=Image.new("L", (SIZE, SIZE), 0), num_inference_steps=STEPS,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(kept, latents, rtol=0, atol=1e-5)


INPAINT_CASES = {
    "strength_1_soft_mask": dict(prompt="a red door", image=picture(1), mask_image=soft_mask()),
    "single_step": dict(prompt="a red door", image=picture(1), mask_image=soft_mask(), strength=0.25),
    "cfg_negative_two_per_prompt": dict(prompt="a red door", negative_prompt="blurry", image=picture(2),
                                        mask_image=soft_mask(), strength=0.75, guidance_scale=3.0,
                                        num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", list(INPAINT_CASES))
def test_inpaint_matches_diffusers(base, reference_parts, case):
    ours = ZImageTRTInpaintPipeline.from_pipe(base)
    out = run_both(ours, reference("ZImageInpaintPipeline", reference_parts), **INPAINT_CASES[case])
    assert out.timings.task == "inpaint" and out.timings.vae_encode_ms > 0


def test_inpaint_keeps_the_unmasked_image(base):
    """After the last step the blend takes the clean image latents where the mask is 0: an all-black mask
    gives back the image's own latents."""
    ours = ZImageTRTInpaintPipeline.from_pipe(base)
    photo = picture(6)
    black = Image.new("L", (SIZE, SIZE), 0)
    kept = ours("x", image=photo, mask_image=black, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images
    encoded = ours.vae.encode(ours.image_processor.preprocess(photo)).latent_dist.sample(torch.Generator().manual_seed(0))
    expected = (encoded - ours.vae.config.shift_factor) * ours.vae.config.scaling_factor
    assert torch.allclose(kept, expected, atol=1e-6)


CONTROLNET_CASES = {
    "default_scale": dict(prompt="a dancer", control_image=picture(3), height=SIZE, width=SIZE),
    "scale_0": dict(prompt="a dancer", control_image=picture(3), height=SIZE, width=SIZE,
                    controlnet_conditioning_scale=0.0),
    "cfg_negative_two_prompts_two_each": dict(
        prompt=["a dancer", "a tower"], negative_prompt=["blurry", "dark"], control_image=picture(4), height=SIZE, width=SIZE,
        guidance_scale=2.0, num_images_per_prompt=2),
}


@pytest.mark.parametrize("net", ["v1-16", "2.1-33"])
@pytest.mark.parametrize("case", list(CONTROLNET_CASES))
def test_controlnet_matches_diffusers(base, reference_parts, controlnets, case, net):
    ours = ZImageTRTControlNetPipeline.from_pipe(base, controlnet=controlnets[net])
    out = run_both(ours, reference("ZImageControlNetPipeline", reference_parts, controlnets[net]),
                   **CONTROLNET_CASES[case])
    assert out.timings.task == "controlnet"


@pytest.mark.parametrize("net", ["v1-16", "2.1-33"])
def test_a_list_of_scales_is_one_per_control_place(base, reference_parts, controlnets, net):
    ours = ZImageTRTControlNetPipeline.from_pipe(base, controlnet=controlnets[net])
    places = len(ours.controlnet.config.control_layers_places)
    refiner = len(ours.controlnet.config.control_refiner_layers_places) if net == "2.1-33" else 0
    scales = [0.3 + 0.4 * k for k in range(refiner + places)]
    run_both(ours, reference("ZImageControlNetPipeline", reference_parts, controlnets[net]), prompt="a dancer",
             control_image=picture(3), height=SIZE, width=SIZE, controlnet_conditioning_scale=scales,
             reference_overrides={"controlnet_conditioning_scale": PerPlace(scales)})


def test_the_controlnet_changes_the_image_and_scale_0_is_text_to_image(base, controlnets):
    ours = ZImageTRTControlNetPipeline.from_pipe(base, controlnet=controlnets["2.1-33"])
    call = dict(prompt="a dancer", height=SIZE, width=SIZE, num_inference_steps=2, output_type="np")
    plain = base(generator=torch.Generator().manual_seed(0), **call).images
    off = ours(control_image=picture(3), controlnet_conditioning_scale=0.0, generator=torch.Generator().manual_seed(0),
               **call).images
    on = ours(control_image=picture(3), generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(off - plain).max() <= PIXEL_TOLERANCE
    assert np.abs(on - plain).max() > 10 * PIXEL_TOLERANCE, "the ControlNet changed nothing"


CONTROLNET_INPAINT_CASES = {
    "default": dict(prompt="a red door", image=picture(1), mask_image=soft_mask(), control_image=picture(3)),
    "cfg_negative_two_per_prompt": dict(
        prompt="a red door", negative_prompt="blurry", image=picture(1), mask_image=soft_mask(),
        control_image=picture(3), guidance_scale=2.0, num_images_per_prompt=2,
        # diffusers 0.42 needs one mask per image for more than one image (it concatenates without repeating)
        reference_overrides={"mask_image": [soft_mask()] * 2}),
    "scales_list": dict(prompt="a red door", image=picture(2), mask_image=soft_mask(), control_image=picture(4),
                        controlnet_conditioning_scale=[0.5, 1.0, 0.0],
                        reference_overrides={"controlnet_conditioning_scale": PerPlace([0.5, 1.0, 0.0])}),
}


@pytest.mark.parametrize("case", list(CONTROLNET_INPAINT_CASES))
def test_controlnet_inpaint_matches_diffusers(base, reference_parts, controlnets, case):
    ours = ZImageTRTControlNetInpaintPipeline.from_pipe(base, controlnet=controlnets["2.1-33"])
    kwargs = {"height": SIZE, "width": SIZE, **CONTROLNET_INPAINT_CASES[case]}
    out = run_both(ours, reference("ZImageControlNetInpaintPipeline", reference_parts, controlnets["2.1-33"]), **kwargs)
    assert out.timings.task == "controlnet-inpaint"


def test_from_pipe_shares_parts_engines_loops_and_telemetry(base, controlnets):
    img2img = ZImageTRTImg2ImgPipeline.from_pipe(base)
    control = ZImageTRTControlNetPipeline.from_pipe(img2img, controlnet=controlnets["v1-16"])
    inpaint = ZImageTRTControlNetInpaintPipeline.from_pipe(control, controlnet=controlnets["2.1-33"])
    for pipe in (img2img, control, inpaint):
        assert pipe.transformer is base.transformer and pipe.vae is base.vae and pipe._loops is base._loops
        assert pipe.telemetry is base.telemetry and pipe._lock is base._lock and pipe._shared_lora is base._shared_lora
    assert ZImageTRTControlNetPipeline.from_pipe(control).controlnet is control.controlnet  # kept unless swapped
    assert control.components["controlnet"] is controlnets["v1-16"] and "controlnet" not in base.components
    calls = base.stats()["calls"]
    img2img("a fox", image=picture(1), num_inference_steps=2, output_type="latent")
    assert base.stats()["calls"] == calls + 1, "one telemetry for the family"


def test_the_task_classes_load_from_pretrained_with_a_controlnet_folder(tiny_path, controlnets, tmp_path):
    controlnets["v1-16"].save_pretrained(tmp_path / "controlnet")
    pipe = ZImageTRTControlNetPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32,
                                                       controlnet=tmp_path / "controlnet")
    assert torch.equal(pipe.controlnet.control_layers[0].after_proj.weight,
                       controlnets["v1-16"].control_layers[0].after_proj.weight)
    with pytest.raises(TypeError, match="takes no \\['controlnet'\\]"):
        ZImageTRTImg2ImgPipeline.from_pipe(pipe, controlnet=controlnets["v1-16"])


def test_a_controlnet_from_one_safetensors_file(tiny_path, controlnets, tmp_path):
    from safetensors.torch import save_file

    model = controlnets["2.1-33"]
    model.save_pretrained(tmp_path / "config")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "union.safetensors")
    pipe = ZImageTRTControlNetPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32,
                                                       controlnet=tmp_path / "union.safetensors",
                                                       controlnet_config=str(tmp_path / "config"))
    assert pipe.controlnet.config.add_control_noise_refiner == "control_noise_refiner"
    assert torch.equal(pipe.controlnet.control_noise_refiner[0].before_proj.weight,
                       model.control_noise_refiner[0].before_proj.weight)


@pytest.fixture(scope="module")
def compiled_base(tiny_path):
    """A pipeline whose denoiser is the torch-compiled engine (as tests/test_lora_engines.py makes one)."""
    original = pipeline_module.open_denoiser
    pipeline_module.open_denoiser = lambda transformer, *a, **k: CompiledDenoiserEngine(StaticZImageDenoiser(transformer))
    try:
        pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.denoise_loop(Resolution(SIZE, SIZE), 1, False)  # opened now, while open_denoiser is the compiled one
    finally:
        pipeline_module.open_denoiser = original
    yield pipe
    pipe.close()


@pytest.mark.slow
def test_controlnet_inpaint_through_a_torch_compiled_engine(compiled_base, reference_parts, controlnets):
    """A compiled engine built without a ControlNet serves one (its blocks compiled at first use)."""
    ours = ZImageTRTControlNetInpaintPipeline.from_pipe(compiled_base, controlnet=controlnets["2.1-33"])
    run_both(ours, reference("ZImageControlNetInpaintPipeline", reference_parts, controlnets["2.1-33"]),
             height=SIZE, width=SIZE, **CONTROLNET_INPAINT_CASES["default"])
    assert {loop.engine.kind for loop in ours._loops.values()} == {"torch-compiled"}


@pytest.mark.slow
def test_inpaint_through_a_torch_compiled_engine(compiled_base, reference_parts):
    ours = ZImageTRTInpaintPipeline.from_pipe(compiled_base)
    run_both(ours, reference("ZImageInpaintPipeline", reference_parts), **INPAINT_CASES["single_step"])


def test_lora_methods_and_submit_on_a_task_class_act_on_the_family(base, controlnets, tmp_path):
    """A LoRA loaded through one task class is the family's (they share the weights), and submit() queues
    that class's own call."""
    from diffusers import ZImagePipeline

    state, config = make_lora(1, rank=4, alpha=8)
    ZImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, weight_name="a.safetensors",
                                     transformer_lora_adapter_metadata=config.to_dict())
    control = ZImageTRTControlNetPipeline.from_pipe(base, controlnet=controlnets["v1-16"])
    call = dict(prompt="a dancer", control_image=picture(3), height=SIZE, width=SIZE, num_inference_steps=2,
                output_type="np")
    before = control(generator=torch.Generator().manual_seed(0), **call).images
    control.load_lora_weights(tmp_path / "a.safetensors", adapter_name="style")
    try:
        assert base.get_list_adapters() == {"transformer": ["style"]} and base.get_active_adapters() == ["style"]
        styled = control.submit(generator=torch.Generator().manual_seed(0), **call).result(timeout=300).images
        assert np.abs(styled - before).max() > 10 * PIXEL_TOLERANCE, "the adapter changed nothing"
    finally:
        base.unload_lora_weights()
        control.close()
    assert control.get_list_adapters() == {}
    again = control(generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(again - before).max() == 0  # unloading restores the base weights bit for bit
