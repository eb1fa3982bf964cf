"""`ZImageTRTControlNetInpaintPipeline`: diffusers' `ZImageControlNetInpaintPipeline` over the engines.

    pipe = ZImageTRTControlNetInpaintPipeline.from_pretrained("path/to/Z-Image-Turbo", controlnet=union_2_1)
    image = pipe("a red door", image=photo, mask_image=mask, control_image=edges).images[0]

As diffusers 0.42: no blending and no `strength`: the inpaint-capable (33-channel) ControlNet takes the
control latents, the inverted mask (1 = keep) at the latent size and the latents of the image with the
repainted region blacked out, and steers a generation from pure noise. The image and mask are resized to
the control image's height x width; a mask of another size than the image is refused; a 16-channel
ControlNet is refused (it has no channels for the mask and the image). Several images per prompt work
with one mask (diffusers 0.42 needs one mask per image there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pipeline import DenoisePlan
from ..request import Request
from ..runtime import image_input
from ..runtime.denoise_loop import ControlInput
from .common import CALL_TAIL, task_call
from .controlnet import (DEFAULT_CONDITIONING_SCALE, ControlImage, ControlNetPipelineParts, check_engine_runs_controlnet,
                         conditioning_scales)
from .inpaint import check_mask, mask_processor


class ControlNetInpaint:
    name = "controlnet-inpaint"

    def __init__(self, pipe, image, mask_image, control_image, scale, height, width):
        channels = int(pipe.controlnet.config.control_in_dim)
        wanted = 2 * pipe.latent_channels + 1
        if channels != wanted:
            raise ValueError(f"this ControlNet takes {channels} control channels; inpainting needs an inpaint-capable "
                             f"one with {wanted} (control latents, mask, masked image latents), such as Union 2.x")
        self.control = ControlImage(pipe, "control_image", control_image, height, width)
        self.height, self.width = self.control.height, self.control.width
        self.start = ControlImage(pipe, "image", image, self.height, self.width)
        self.mask = check_mask(mask_image, image_input.pixel_size(image), self.height, self.width, mask_processor(pipe))
        self.scales = conditioning_scales(pipe.controlnet.config, scale)

    def check(self, pipe, request: Request) -> None:
        self.control.check_batch(request)
        self.start.check_batch(request)
        image_input.check_count("mask_image", self.mask.shape[0], request.images, request.per_prompt, "interleave")
        check_engine_runs_controlnet(pipe, request)

    def plan(self, pipe, request: Request, generator, latents) -> DenoisePlan:
        control = self.control.latents(pipe, request)
        mask = image_input.batch_of("mask_image", self.mask, request.images, request.per_prompt, "interleave")
        masked = self.start.batch(request) * (mask < 0.5)  # diffusers: the repainted region blacked out
        masked_latents = image_input.encode(pipe.vae, masked, sample=False).to(pipe.device)
        keep = F.interpolate(1 - mask[:, :1], size=masked_latents.shape[-2:], mode="nearest").to(pipe.device)
        context = torch.cat([control, keep, masked_latents], dim=1)
        plan = pipe.plan(request, generator, latents)  # seeded noise, the whole schedule
        plan.control = ControlInput(pipe.controlnet, context, self.scales)
        return plan


class ZImageTRTControlNetInpaintPipeline(ControlNetPipelineParts):
    """Image + mask + control image + text -> image. Everything ZImageTRTPipeline takes, plus `image`,
    `mask_image`, `control_image` and `controlnet_conditioning_scale`."""

    @task_call("prompt", "height", "width", "num_inference_steps", "sigmas", "guidance_scale", "image", "mask_image",
               "control_image", "controlnet_conditioning_scale", *CALL_TAIL)
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, control_image=None,
                 controlnet_conditioning_scale: float | list[float] = DEFAULT_CONDITIONING_SCALE,
                 height: int | None = None, width: int | None = None, **kwargs):
        """diffusers' `ZImageControlNetInpaintPipeline.__call__` (Turbo's 8 steps and guidance 0 by default)."""
        task = ControlNetInpaint(self, image, mask_image, control_image, controlnet_conditioning_scale, height, width)
        return self._call(task, self._call_arguments(prompt=prompt, height=task.height, width=task.width, **kwargs))
