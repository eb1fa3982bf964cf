"""The image tasks over the one denoising core of `ZImageTRTPipeline`, one module per task (diffusers'
Z-Image family): image to image, inpainting, ControlNet, ControlNet inpainting. Each task prepares the
starting latents, the schedule, the mask and the ControlNet context (a `DenoisePlan`) and calls the same
`_call` as text to image."""

from .controlnet import ZImageTRTControlNetPipeline
from .controlnet_inpaint import ZImageTRTControlNetInpaintPipeline
from .img2img import ZImageTRTImg2ImgPipeline
from .inpaint import ZImageTRTInpaintPipeline

__all__ = ["ZImageTRTImg2ImgPipeline", "ZImageTRTInpaintPipeline", "ZImageTRTControlNetPipeline",
           "ZImageTRTControlNetInpaintPipeline"]
