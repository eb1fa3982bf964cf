"""One size convention: text is WIDTHxHEIGHT (OpenAI's `size`, A1111, ComfyUI), Python keeps height=/width=."""

import pytest
import torch

from zimage_trt.model.shapes import Resolution, check_fits_rope


def test_text_is_width_first():
    landscape = Resolution.parse("1344x768")
    assert (landscape.width, landscape.height) == (1344, 768)
    assert landscape.key == str(landscape) == "1344x768"
    portrait = Resolution.parse("768X1344")
    assert (portrait.width, portrait.height) == (768, 1344) and portrait.key == "768x1344"
    assert Resolution.parse("1024") == Resolution(height=1024, width=1024)
    for size in ("1344x768", "768x1344", "256x384"):
        assert Resolution.parse(size).key == size  # what is read is written back the same way


def test_python_keeps_height_then_width():
    size = Resolution(height=768, width=1344)
    assert size.key == "1344x768" and size.latent_hw == (96, 168)
    assert Resolution.parse((768, 1344)) == size  # a pair is (height, width), as diffusers' arguments
    assert Resolution.of_latents(torch.zeros(1, 16, 96, 168)) == size


def test_an_unreadable_size_says_how_to_write_one():
    with pytest.raises(ValueError, match=r"cannot read size 'wide': write WIDTHxHEIGHT.*'1344x768' for an image "
                                         r"1344 wide and 768 tall"):
        Resolution.parse("wide")


def test_errors_name_the_side_that_is_wrong():
    with pytest.raises(ValueError, match="width=1000 is not a multiple of 16"):
        Resolution.parse("1000x1024")
    with pytest.raises(ValueError, match="height=1000 is not a multiple of 16"):
        Resolution.parse("1024x1000")
    with pytest.raises(ValueError, match=r"width=8208 is 513 image tokens.*axes_lens\[2\]"):
        check_fits_rope(Resolution.parse("8208x256"), (1024, 512, 512))


def test_a_controlnets_kept_kernels_are_filed_under_width_x_height():
    """The torch-compiled engine's key for a ControlNet's kernels at a non-square shape: WIDTHxHEIGHT."""
    from types import SimpleNamespace

    from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine

    keys = []
    engine = SimpleNamespace(keep_kernels=keys.append, _kept=set())
    controlnet = SimpleNamespace(config={"control_layers_places": [0, 2]})
    latent_shape = Resolution(height=768, width=1344).latent_shape(1)  # (1, 16, 96, 168): landscape
    CompiledDenoiserEngine.controlnet_kernels_compiled(engine, controlnet, latent_shape, 2)
    assert len(keys) == 1 and keys[0].endswith("-1344x768-b2"), keys
    assert Resolution.of_latents(latent_shape) == Resolution(height=768, width=1344)  # a shape is read as a tensor
