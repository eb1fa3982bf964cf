"""What the task classes share: their call signatures, `strength` and the schedule it cuts, the checks of
a task's inputs against the request."""

from __future__ import annotations

import functools
import inspect
import math
import numbers

from ..model.shapes import check_side
from ..pipeline import ZImageTRTPipeline
from ..request import Request


def task_call(*order: str):
    """A task's `__call__` taking diffusers' parameters in `order` (the diffusers class's `__call__`, all
    of them positional there and here), then ZImageTRTPipeline's own extras (keyword-only). `call` is the
    implementation: `(self, <its own parameters>, **kwargs)`, called with keywords only; shown (inspect,
    help) with the whole signature, its own parameters' defaults and ZImageTRTPipeline's for the rest."""
    def wrap(call):
        own = inspect.signature(call).parameters
        base = inspect.signature(ZImageTRTPipeline.__call__)
        positional = [(own[name] if name in own and own[name].kind is not inspect.Parameter.VAR_KEYWORD
                       else base.parameters[name]).replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                      for name in order]
        extras = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in base.parameters.items()
                  if name not in order and name != "self"]
        signature = inspect.Signature([own["self"], *positional, *extras], return_annotation=base.return_annotation)

        @functools.wraps(call)
        def __call__(self, *args, **kwargs):
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{type(self).__name__}.__call__: {error}; it takes "
                                f"{list(signature.parameters)[1:]}") from None
            arguments = dict(bound.arguments)
            del arguments["self"]
            return call(self, **arguments)

        __call__.__signature__ = signature
        return __call__
    return wrap


# diffusers 0.42's order of the parameters every Z-Image class shares, after the task's own.
CALL_TAIL = ("cfg_normalization", "cfg_truncation", "negative_prompt", "num_images_per_prompt", "generator",
             "latents", "prompt_embeds", "negative_prompt_embeds", "output_type", "return_dict",
             "joint_attention_kwargs", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
             "max_sequence_length")


def check_strength(strength) -> float:
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
        raise TypeError(f"strength must be a number in [0, 1], got {type(strength).__name__} {strength!r}")
    if not math.isfinite(float(strength)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0.0, 1.0] (1 ignores the image, smaller keeps more of it), "
                         f"got {strength}")
    return float(strength)


def first_step(steps: int, strength: float) -> int:
    """diffusers' `get_timesteps`: the index of the first step `strength` leaves."""
    return int(max(steps - min(steps * strength, steps), 0))


def check_steps_left(request: Request, strength: float) -> None:
    """diffusers' rule (`get_timesteps`, then "the number of pipeline steps is 0"): the steps left are
    `steps - int(steps - steps * strength)`, at least 1 for every strength > 0 and any number of steps;
    only strength 0 (keep the image as it is), or one so small that `steps - steps * strength` rounds to
    `steps` in floating point, leaves none, and more steps do not help."""
    left = request.steps - first_step(request.steps, strength)
    if left < 1:
        if strength:
            why = (f"steps * strength = {request.steps * strength:.3g} is lost in floating-point rounding; pass a "
                   f"larger strength")
        else:
            why = "strength 0 keeps the image as it is; pass a strength > 0"
        raise ValueError(f"strength={strength} with {request.steps} steps leaves {left} denoising steps: {why} "
                         f"(every other strength > 0 leaves at least 1 step, with any num_inference_steps)")


def strength_schedule(pipe, request: Request, strength: float):
    """(timesteps, sigmas) of the steps `strength` leaves, diffusers' `get_timesteps` (and the scheduler's
    begin index, so that its `scale_noise` noises the image at the first of them)."""
    timesteps, sigmas = pipe.schedule(request.steps, pipe.latent_shape(request.images, request.resolution),
                                      request.sigmas)
    start = first_step(len(timesteps), strength)
    pipe.scheduler.set_begin_index(start)
    return timesteps[start:], sigmas[start:]


def check_sizes(height, width) -> None:
    """The caller's height/width (None: the task's default) by text to image's rule (`check_side`: an int,
    a positive multiple of 16), before any image is resized to them."""
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_side(name, value)


def resolved_size(pixels, height, width) -> tuple[int, int]:
    """(height, width): the caller's (`check_sizes` checked them), else the preprocessed image's (diffusers'
    default)."""
    return (height if height is not None else int(pixels.shape[-2]),
            width if width is not None else int(pixels.shape[-1]))
