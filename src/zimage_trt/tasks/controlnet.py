"""`ZImageTRTControlNetPipeline`: diffusers' `ZImageControlNetPipeline` over the engines, and what both
ControlNet classes share (loading a ControlNet, its place on the device, its scales, the control image).

    pipe = ZImageTRTControlNetPipeline.from_pretrained("path/to/Z-Image-Turbo", engine_dir="engines/",
                                                       controlnet="Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors",
                                                       controlnet_config="path/to/its/config/folder")
    image = pipe("a dancer", control_image=pose, controlnet_conditioning_scale=0.75).images[0]

As diffusers: the control image is resized to height x width (default 1024, not the image's), encoded
by the VAE (the mode of its latent distribution), padded with zeros to the ControlNet's
`control_in_dim` (33-channel, inpaint-capable models), and the ControlNet runs every step on the noisy
latents; here inside the denoiser's step, reusing its refined tokens (model/controlnet.py), in the step's
CUDA graph. A torch tensor `control_image` is taken as it is ([B, 3, H, W] in [-1, 1]), as diffusers does.

`controlnet_conditioning_scale`: a number scales every hint (diffusers); a list (diffusers 0.42 fails
on one) gives one scale per control place, in the order the model adds them: the noise-refiner places
of 2.x models (`control_refiner_layers_places`), then `control_layers_places`.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch
from diffusers import ZImageControlNetModel

from ..model.controlnet import check_fits, hint_count
from ..model.weights import is_hub_id
from ..pipeline import DenoisePlan, ZImageTRTPipeline
from ..request import DEFAULT_SIDE, Request
from ..runtime import image_input
from ..runtime.denoise_loop import ControlInput, check_runs_controlnet
from ..runtime.placement import move
from .common import CALL_TAIL, check_sizes, task_call

DEFAULT_CONDITIONING_SCALE = 0.75  # diffusers' ZImageControlNetPipeline


def load_controlnet(controlnet, config=None, torch_dtype: torch.dtype | None = None):
    """A loaded `ZImageControlNetModel`, a diffusers-format folder (or hub id), or one .safetensors file
    read by diffusers' own `ZImageControlNetModel.from_single_file` (Union v1 / 2.0 / 2.1 layouts; its
    config from `config`, a folder or hub id holding config.json, else the hub repo diffusers names)."""
    if isinstance(controlnet, ZImageControlNetModel):
        return controlnet
    if not isinstance(controlnet, (str, os.PathLike)):
        raise TypeError(f"controlnet must be a ZImageControlNetModel, a folder, a .safetensors file or a hub id, "
                        f"got {type(controlnet).__name__}")
    path = Path(controlnet)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"controlnet file {path} is not a .safetensors file (pickled checkpoints are "
                                 f"never loaded)")
            return ZImageControlNetModel.from_single_file(str(path), config=config, torch_dtype=torch_dtype)
        if path.is_dir() or (not path.exists() and is_hub_id(os.fspath(controlnet))):
            return ZImageControlNetModel.from_pretrained(str(controlnet), torch_dtype=torch_dtype, use_safetensors=True)
    except OSError as error:
        raise ValueError(f"could not load the ControlNet {controlnet}: {error}; for one .safetensors file pass "
                         f"controlnet_config= a folder (or hub id) with its config.json") from error
    raise ValueError(f"controlnet {controlnet} is neither a file nor a folder")


def conditioning_scales(config, value) -> torch.Tensor:
    """One float32 scale per control place from a number or a list (see the module's docstring)."""
    count = hint_count(config)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(float(v)):
            raise ValueError(f"controlnet_conditioning_scale must be a finite number or a list of them, got {value!r}")
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        refiner = list(config.control_refiner_layers_places or []) if config.add_control_noise_refiner else []
        raise ValueError(f"controlnet_conditioning_scale has {len(values)} values; this ControlNet takes one number "
                         f"or {count}: one per control place, the noise-refiner places {refiner} first, then the "
                         f"layer places {list(config.control_layers_places)}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class ControlImage:
    """The control image (or, for inpainting, the image): checked, at height x width."""

    def __init__(self, pipe, name: str, image, height, width):
        check_sizes(height, width)  # as text to image: 200 is refused, never resized to 192
        image_input.check_image(name, image)
        self.name = name
        first = image[0] if isinstance(image, (list, tuple)) else image
        if isinstance(first, torch.Tensor):  # diffusers: a tensor is taken as it is
            pixels = torch.cat([t if t.ndim == 4 else t[None] for t in ([image] if first is image else image)])
            size = tuple(int(s) for s in pixels.shape[-2:])
            wanted = (height or size[0], width or size[1])
            if wanted != size:
                raise ValueError(f"{name} is a tensor of {size[1]}x{size[0]} (WIDTHxHEIGHT), taken as it is; "
                                 f"width x height is {wanted[1]}x{wanted[0]}: resize it or pass a PIL image")
            self.pixels = pixels.to(torch.float32)
        else:
            self.pixels = image_input.preprocess(pipe.image_processor, name, image, height or DEFAULT_SIDE,
                                                 width or DEFAULT_SIDE)
        self.image = image
        self.height, self.width = (int(s) for s in self.pixels.shape[-2:])

    def check_batch(self, request: Request) -> None:
        image_input.check_count(self.name, self.pixels.shape[0], request.images, request.per_prompt, "interleave")

    def batch(self, request: Request) -> torch.Tensor:
        return image_input.batch_of(self.name, self.pixels, request.images, request.per_prompt, "interleave")

    def latents(self, pipe, request: Request) -> torch.Tensor:
        """The VAE's mode for each image to make (encoded once per distinct image)."""
        encoded = image_input.encode(pipe.vae, self.pixels, sample=False).to(pipe.device)
        return image_input.batch_of(self.name, encoded, request.images, request.per_prompt, "interleave")


class ControlNetPipelineParts(ZImageTRTPipeline):
    """What both ControlNet classes add to ZImageTRTPipeline: `controlnet=` (and `controlnet_config=` for
    one .safetensors file) in every constructor and in `from_pipe`."""

    TASK_KEYWORDS = ("controlnet", "controlnet_config")

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler, controlnet=None,
                 controlnet_config=None, options=None, **option_keywords):
        super().__init__(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler=scheduler, options=options, **option_keywords)
        self._set_controlnet(controlnet, controlnet_config)

    def _task_parts(self, source, controlnet=None, controlnet_config=None, **kwargs) -> None:
        super()._task_parts(source, **kwargs)
        self._set_controlnet(controlnet if controlnet is not None else getattr(source, "controlnet", None),
                             controlnet_config)

    def _set_controlnet(self, controlnet, config) -> None:
        if controlnet is None:
            raise ValueError(f"{type(self).__name__} needs controlnet=: a ZImageControlNetModel, a diffusers-format "
                             f"folder, or one .safetensors file (with controlnet_config=)")
        if self._parallel is not None:
            raise ValueError("a ControlNet runs inside each step on one GPU; use sequence_parallel=1")
        model = load_controlnet(controlnet, config, self.dtype)
        check_fits(model.config, self.transformer.config)
        move(model, self.device, self.dtype)
        self.controlnet = model.eval().requires_grad_(False)

    @property
    def components(self) -> dict:
        return {**super().components, "controlnet": self.controlnet}


def check_engine_runs_controlnet(pipe, request: Request) -> None:
    """The engine for this shape runs a ControlNet inside its step (`runs_controlnet`, what the loop asks
    of it), checked before any text or VAE encoding: opens the engine (and its loop) as the call would."""
    with pipe._lock, pipe._on_device():
        engine = pipe.denoise_loop(request.resolution, request.images, request.cfg).engine
    check_runs_controlnet(engine)


class ControlNet:
    name = "controlnet"

    def __init__(self, pipe, control_image, scale, height, width):
        self.control = ControlImage(pipe, "control_image", control_image, height, width)
        self.scales = conditioning_scales(pipe.controlnet.config, scale)
        self.height, self.width = self.control.height, self.control.width

    def check(self, pipe, request: Request) -> None:
        self.control.check_batch(request)
        check_engine_runs_controlnet(pipe, request)

    def context(self, pipe, request: Request) -> torch.Tensor:
        """The control latents, zeros in the channels of an inpaint-capable model (as diffusers)."""
        latents = self.control.latents(pipe, request)
        extra = int(pipe.controlnet.config.control_in_dim) - latents.shape[1]
        return torch.cat([latents, latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])], dim=1)

    def plan(self, pipe, request: Request, generator, latents) -> DenoisePlan:
        context = self.context(pipe, request)
        plan = pipe.plan(request, generator, latents)  # seeded noise, the whole schedule (text to image's)
        plan.control = ControlInput(pipe.controlnet, context, self.scales)
        return plan


class ZImageTRTControlNetPipeline(ControlNetPipelineParts):
    """Control image + text -> image. Everything ZImageTRTPipeline takes, plus `control_image` and
    `controlnet_conditioning_scale`."""

    @task_call("prompt", "height", "width", "num_inference_steps", "sigmas", "guidance_scale", "control_image",
               "controlnet_conditioning_scale", *CALL_TAIL)
    @torch.no_grad()
    def __call__(self, prompt=None, control_image=None,
                 controlnet_conditioning_scale: float | list[float] = DEFAULT_CONDITIONING_SCALE,
                 height: int | None = None, width: int | None = None, **kwargs):
        """diffusers' `ZImageControlNetPipeline.__call__` (Turbo's 8 steps and guidance 0 by default, as ours)."""
        task = ControlNet(self, control_image, controlnet_conditioning_scale, height, width)
        return self._call(task, self._call_arguments(prompt=prompt, height=task.height, width=task.width, **kwargs))
