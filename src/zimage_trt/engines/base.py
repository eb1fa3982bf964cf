"""The one interface every denoiser engine offers the runtime, and the eager-torch reference engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..model.controlnet import StaticZImageControlNet
from ..model.denoiser import StaticZImageDenoiser
from ..model.shapes import padded_caption_length


def check_runs_controlnet(engine) -> None:
    """Refuse an engine that cannot run a ControlNet inside its step (`runs_controlnet`), naming those that
    can: the loop asks it when it makes a ControlNet slot, the ControlNet tasks before any encoding."""
    if not getattr(engine, "runs_controlnet", False):
        raise ValueError(f"this {getattr(engine, 'kind', type(engine).__name__)} engine cannot run a ControlNet "
                         f"inside its step; use the eager or torch-compiled engines (engine_dir=None, or a "
                         f"torch-compiled build)")


class DenoiserEngine(ABC):
    """Runs the static denoiser maths for one call: tensors in, float32 model output out.

    Subclasses set `kind`, `device`, `dtype` and implement `run`. `caption_layout` tells the runtime
    how wide a caption buffer to give for a batch of caption lengths, and whether the engine needs the
    caption key mask (a fixed-capacity engine always does; a shape-flexible one only when the
    batch's padded lengths differ).
    """

    kind = "abstract"
    supports_cuda_graph = False

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype

    def caption_layout(self, caption_lengths: list[int], resolution_key: str, batch: int) -> tuple[int, bool]:
        padded = [padded_caption_length(n) for n in caption_lengths]
        capacity = max(padded)
        return capacity, any(p != capacity for p in padded)

    # Engines that run the model's own parameters (eager, torch-compiled) see in-place weight changes
    # (LoRA fused or unfused into the transformer) at once; engines holding their own copy of the
    # weights (TensorRT) override this and take the new values (a refit).
    holds_own_weights = False

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take new values for the named transformer weights (diffusers state-dict names)."""
        if self.holds_own_weights:
            raise NotImplementedError(f"{type(self).__name__} holds its own weights but cannot update them")

    # Whether `run` takes `controlnet_hints` (contract.CONTROLNET_HINTS): the eager and torch-compiled
    # engines run the model's own forward, which takes them; a TensorRT engine only in its ControlNet-ready
    # variant (a build option).
    takes_controlnet_hints = True
    # Whether `run` takes `control=` (a model.controlnet.ControlStep): the ControlNet computed inside the
    # step, from the denoiser's own refined tokens (engines that run the static model themselves).
    runs_controlnet = False

    def controlnet_runner(self, controlnet):
        """The form of a ControlNet this engine runs inside its step (`runs_controlnet` engines override it)."""
        check_runs_controlnet(self)
        raise TypeError(f"{type(self).__name__} sets runs_controlnet but does not override controlnet_runner")

    @abstractmethod
    def run(self, latents, timestep, cap_feats, cap_lens, masked: bool, controlnet_hints=None) -> torch.Tensor:
        """Model output [B, 16, h, w] float32 for one call, enqueued on the current stream.

        `controlnet_hints` [P, B, S, D] (see engines/contract.py) are added after the denoiser's
        `control_places`; None for a plain (text-to-image) step, which then pays nothing for them."""


class TorchDenoiserEngine(DenoiserEngine):
    """Eager PyTorch: the reference engine (CPU tests, the demo, `allow_fallback=True`)."""

    kind = "eager"
    runs_controlnet = True

    def __init__(self, denoiser: StaticZImageDenoiser):
        super().__init__(denoiser.device, denoiser.dtype)
        self.denoiser = denoiser.eval()
        self.supports_cuda_graph = self.device.type == "cuda"
        self._controlnets: dict[int, tuple] = {}  # id(diffusers ControlNet) -> (it, its static form here)

    def controlnet_runner(self, controlnet) -> StaticZImageControlNet:
        """`controlnet`'s static form over this engine's denoiser, configured as it runs (attention,
        fused kernels, FP8, fp16 downscale), made at its first use and kept."""
        known = self._controlnets.get(id(controlnet))
        if known is not None and known[0] is controlnet:
            return known[1]
        net = StaticZImageControlNet(controlnet, self.denoiser).eval()
        net.configure_like(self.denoiser)
        self._controlnet_ready(net)
        self._controlnets[id(controlnet)] = (controlnet, net)
        return net

    def _controlnet_ready(self, net: StaticZImageControlNet) -> None:
        """A torch-compiled engine compiles its blocks here; eager runs them as they are."""

    @torch.no_grad()
    def run(self, latents, timestep, cap_feats, cap_lens, masked: bool, controlnet_hints=None, control=None) -> torch.Tensor:
        extra = {} if control is None else {"control": control}  # (a sharded denoiser takes none)
        return self.denoiser(latents, timestep, cap_feats, cap_lens, mask_caption_keys=masked,
                             controlnet_hints=controlnet_hints, **extra)
