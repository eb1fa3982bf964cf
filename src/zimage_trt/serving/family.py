"""One family of pipelines over one set of weights: the service's text-to-image pipeline, and the image
tasks made from it with `from_pipe` (tasks/), sharing its parts, engines, loops, lock and telemetry.

    family = PipelineFamily(pipe, controlnet="union-2.1/", control_scale=0.75)
    family.tasks          # ("text-to-image", "image-to-image", "inpaint", "controlnet", "controlnet-inpaint")
    task = family.task_for(images)        # which one a request runs (ServiceError 422 if none serves it)
    out = family.run(task, images, prompt, height=..., width=..., generator=..., ...)

Which task a request runs: a generation runs text to image, or ControlNet with a `control_image`; an edit
runs image to image without a mask, inpainting with one, ControlNet inpainting with a mask and a
`control_image` (diffusers has no ControlNet image-to-image: an edit with a control image and no mask is
refused). The ControlNet tasks exist on a server started with `--controlnet`; ControlNet inpainting needs
an inpaint-capable (33-channel) ControlNet. A stand-in pipeline (not a ZImageTRTPipeline) serves text to
image only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from ..pipeline import TEXT_TO_IMAGE, ZImageTRTPipeline
from ..tasks import (
    ZImageTRTControlNetInpaintPipeline,
    ZImageTRTControlNetPipeline,
    ZImageTRTImg2ImgPipeline,
    ZImageTRTInpaintPipeline,
)
from ..tasks.common import first_step
from ..tasks.controlnet import DEFAULT_CONDITIONING_SCALE, ControlNet
from ..tasks.controlnet_inpaint import ControlNetInpaint
from ..tasks.img2img import DEFAULT_STRENGTH as IMG2IMG_STRENGTH
from ..tasks.img2img import ImageToImage
from ..tasks.inpaint import DEFAULT_STRENGTH as INPAINT_STRENGTH
from ..tasks.inpaint import Inpaint, mask_processor
from .outcome import ServiceError

# The tasks' own names (what each pipeline call records in its Timings): "image-to-image", "inpaint", ...
IMAGE_TO_IMAGE, INPAINT, CONTROLNET, CONTROLNET_INPAINT = (ImageToImage.name, Inpaint.name, ControlNet.name,
                                                           ControlNetInpaint.name)
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT, CONTROLNET, CONTROLNET_INPAINT)
_CLASSES = {IMAGE_TO_IMAGE: ZImageTRTImg2ImgPipeline, INPAINT: ZImageTRTInpaintPipeline}
_WITH_STRENGTH = (IMAGE_TO_IMAGE, INPAINT)


@dataclass
class TaskImages:
    """A request's images, decoded (uploads.py) and at the request's size: the starting `image`, the
    `mask` (an "L" image, white = repaint), the `control_image`; and the edit's `strength` (None: the
    task's default)."""

    image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None
    control_image: PIL.Image.Image | None = None
    strength: float | None = None

    @property
    def task(self) -> str:
        if self.image is None:
            return CONTROLNET if self.control_image is not None else TEXT_TO_IMAGE
        if self.mask is None:
            return IMAGE_TO_IMAGE  # (with a control image: refused by task_for)
        return CONTROLNET_INPAINT if self.control_image is not None else INPAINT

    @property
    def count(self) -> int:
        """Input images, for OpenAI's usage.input_tokens_details.image_tokens."""
        return (self.image is not None) + (self.control_image is not None)

    def resolved_strength(self, task: str) -> float | None:
        if task not in _WITH_STRENGTH:
            return None
        if self.strength is not None:
            return self.strength
        return IMG2IMG_STRENGTH if task == IMAGE_TO_IMAGE else INPAINT_STRENGTH


CONTROLNET_NEEDS_ONE_GPU = "a ControlNet runs inside each step on one GPU: serve it without --sequence-parallel"


def no_controlnet() -> ServiceError:
    return ServiceError(422, "invalid_value", "control_image needs a server started with --controlnet (this one "
                        "serves no ControlNet)", param="control_image")


def steps_run(task: str, steps: int, strength: float | None) -> int:
    """Denoising steps a request runs: `strength` keeps the last ones (diffusers' get_timesteps)."""
    return steps - first_step(steps, strength) if task in _WITH_STRENGTH and strength is not None else steps


def check_strength_leaves_steps(task: str, steps: int, strength: float | None) -> None:
    if steps_run(task, steps, strength) < 1:
        raise ServiceError(422, "invalid_value", f"strength {strength} with {steps} steps leaves no denoising step "
                           f"(the image would come back as it is): use a strength above 0 (1 ignores the image)",
                           param="strength")


class PipelineFamily:
    """The pipelines a service runs, by task (see the module's docstring)."""

    def __init__(self, pipe, controlnet: Any = None, controlnet_config: str | None = None,
                 control_scale: float | list[float] = DEFAULT_CONDITIONING_SCALE):
        self.pipes: dict[str, Any] = {TEXT_TO_IMAGE: pipe}
        self.unserved: dict[str, str] = {}  # a task this server does not run -> why
        self.control_scale = control_scale
        self.controlnet_channels: int | None = None
        if not isinstance(pipe, ZImageTRTPipeline):
            if controlnet is not None:
                raise ValueError(f"a ControlNet needs a ZImageTRTPipeline to share, not a {type(pipe).__name__}")
            return
        # A sequence-parallel pipeline (serve --sequence-parallel N) runs what the sharded loop runs: inpainting
        # and a ControlNet work inside each step on one GPU (tasks/inpaint.py, tasks/controlnet.py refuse it).
        sequence_parallel = int(getattr(pipe.options, "sequence_parallel", 1)) != 1
        if sequence_parallel and controlnet is not None:
            raise ValueError(CONTROLNET_NEEDS_ONE_GPU)
        for task, cls in _CLASSES.items():
            if sequence_parallel and task == INPAINT:
                self.unserved[task] = "a sequence-parallel server runs no inpainting (its blend runs inside each step)"
                continue
            self.pipes[task] = cls.from_pipe(pipe)
        if controlnet is not None:
            control = ZImageTRTControlNetPipeline.from_pipe(pipe, controlnet=controlnet, controlnet_config=controlnet_config)
            control.set_progress_bar_config(disable=True)
            self.pipes[CONTROLNET] = control
            self.controlnet_channels = int(control.controlnet.config.control_in_dim)
            if self.controlnet_channels == 2 * pipe.latent_channels + 1:  # the ControlNet made above, shared
                self.pipes[CONTROLNET_INPAINT] = ZImageTRTControlNetInpaintPipeline.from_pipe(control)
        for task_pipe in self.pipes.values():
            task_pipe.set_progress_bar_config(disable=True)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task in TASKS if task in self.pipes)

    @property
    def base(self):
        return self.pipes[TEXT_TO_IMAGE]

    def task_for(self, images: TaskImages | None) -> str:
        """The task `images` ask for, or a ServiceError 422 saying why this server does not run it."""
        task = images.task if images is not None else TEXT_TO_IMAGE
        if images is not None and images.image is not None and images.mask is None and images.control_image is not None:
            raise ServiceError(422, "invalid_value", "control_image on an edit needs a mask (ControlNet inpainting); "
                               "for an image from a control image alone use /v1/images/generations with "
                               "control_image", param="control_image")
        if task in self.pipes:
            return task
        if task in (CONTROLNET, CONTROLNET_INPAINT) and CONTROLNET not in self.pipes:
            raise no_controlnet()
        if task == CONTROLNET_INPAINT:
            raise ServiceError(422, "invalid_value", f"this server's ControlNet takes {self.controlnet_channels} "
                               f"control channels; inpainting with control_image needs an inpaint-capable one "
                               f"(33 channels, such as Union 2.x): leave out control_image, or the mask",
                               param="control_image")
        why = f": {self.unserved[task]}" if task in self.unserved else ""
        raise ServiceError(422, "invalid_value", f"this server does not run {task} (it runs {', '.join(self.tasks)})"
                           f"{why}", param="image")

    def fit(self, images: TaskImages, height: int, width: int) -> TaskImages:
        """The images resized to height x width by the pipelines' own processors (diffusers' resize: what
        the pipeline would do itself, done here off the GPU worker, and the large upload let go)."""
        processor = getattr(self.base, "image_processor", None)
        if processor is None:
            return images

        def fitted(image, by):
            return None if image is None else by.resize(image, height, width)

        return TaskImages(fitted(images.image, processor), fitted(images.mask, mask_processor(self.base)),
                          fitted(images.control_image, processor), images.strength)

    def run(self, task: str, images: TaskImages | None, prompt: str, **call):
        """One call of `task`'s pipeline: `call` holds what every task takes (size, steps, generator, ...)."""
        extras: dict[str, Any] = {}
        if task in (IMAGE_TO_IMAGE, INPAINT, CONTROLNET_INPAINT):
            extras["image"] = images.image
        if task in (INPAINT, CONTROLNET_INPAINT):
            extras["mask_image"] = images.mask
        if task in _WITH_STRENGTH:
            extras["strength"] = images.resolved_strength(task)
        if task in (CONTROLNET, CONTROLNET_INPAINT):
            extras.update(control_image=images.control_image, controlnet_conditioning_scale=self.control_scale)
        return self.pipes[task](prompt, **extras, **call)

    def warm(self, height: int, width: int, steps: int, prompt: str) -> None:
        """One call of every image task at this size (text to image is the service's own warm-up): their
        encoders, blends and ControlNet graphs are captured before the first request."""
        grey = PIL.Image.new("RGB", (width, height), (128, 128, 128))
        half = PIL.Image.new("L", (width, height), 0)
        half.paste(255, (0, 0, width // 2, height))
        for task in self.tasks:
            if task == TEXT_TO_IMAGE:
                continue
            images = TaskImages(image=None if task == CONTROLNET else grey,
                                mask=half if task in (INPAINT, CONTROLNET_INPAINT) else None,
                                control_image=grey if task in (CONTROLNET, CONTROLNET_INPAINT) else None, strength=1.0)
            self.run(task, images, prompt, height=height, width=width, num_inference_steps=steps,
                     generator=torch.Generator(self.base.device).manual_seed(0))
