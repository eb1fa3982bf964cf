"""The task classes' rules that need no model: `strength` and the steps it leaves (diffusers'
`get_timesteps`), and the call signatures against diffusers' classes."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import ZImageImg2ImgPipeline

from zimage_trt.tasks.common import check_steps_left, first_step


def diffusers_steps_left(steps: int, strength: float) -> int:
    scheduler = SimpleNamespace(timesteps=torch.arange(steps, 0, -1), order=1, set_begin_index=lambda i: None)
    return ZImageImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")[1]


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 9, 50, 1000])
@pytest.mark.parametrize("strength", [1e-9, 1e-3, 0.01, 0.1, 1 / 9, 0.124, 0.5, 0.6, 0.99, 1.0])
def test_every_strength_above_0_leaves_a_step_as_diffusers(steps, strength):
    left = steps - first_step(steps, strength)
    assert left == diffusers_steps_left(steps, strength) >= 1
    check_steps_left(SimpleNamespace(steps=steps), strength)  # no error


@pytest.mark.parametrize("steps", [1, 8, 1000])
def test_only_strength_0_or_one_lost_in_rounding_leaves_no_step_and_more_steps_do_not_help(steps):
    assert diffusers_steps_left(steps, 0.0) == 0
    with pytest.raises(ValueError, match=rf"strength=0.0 with {steps} steps leaves 0 denoising steps: strength 0 "
                                         r"keeps the image as it is; pass a strength > 0") as error:
        check_steps_left(SimpleNamespace(steps=steps), 0.0)
    assert "num_inference_steps" not in str(error.value).split("(")[0]  # no advice to raise the steps
    assert diffusers_steps_left(steps, 1e-20) == 0
    with pytest.raises(ValueError, match="is lost in floating-point rounding; pass a larger strength"):
        check_steps_left(SimpleNamespace(steps=steps), 1e-20)


PAIRS = [("ZImageTRTPipeline", "ZImagePipeline"), ("ZImageTRTImg2ImgPipeline", "ZImageImg2ImgPipeline"),
         ("ZImageTRTInpaintPipeline", "ZImageInpaintPipeline"),
         ("ZImageTRTControlNetPipeline", "ZImageControlNetPipeline"),
         ("ZImageTRTControlNetInpaintPipeline", "ZImageControlNetInpaintPipeline")]


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_the_call_takes_diffusers_parameters_in_diffusers_order(ours, theirs):
    """Positional calls mean what they mean in diffusers: the parameters both have in diffusers' order,
    positional as there; ours-only extras keyword-only, after them."""
    import diffusers

    import zimage_trt

    mine = list(inspect.signature(getattr(zimage_trt, ours).__call__).parameters.values())[1:]
    their_names = [name for name in inspect.signature(getattr(diffusers, theirs).__call__).parameters][1:]
    positional = [p.name for p in mine if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [name for name in their_names if name in {p.name for p in mine}]
    assert [p.name for p in mine[:len(positional)]] == positional  # the extras come after
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in mine[len(positional):])
    assert {p.name for p in mine[len(positional):]} == {p.name for p in mine} - set(their_names)
