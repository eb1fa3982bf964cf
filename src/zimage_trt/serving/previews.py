"""Partial images for a streaming request (OpenAI's `partial_images`): what the image will look like,
shown while it is being made, for a small fraction of its time.

What is shown: the current prediction of the clean latents, x0 = x - sigma * v. The loop's Euler step is
x_next = x + (sigma_next - sigma) * v, so two consecutive step-end latents give v, and
x0 = x_next - sigma_next * v (no model call, no extra tensor from the loop).

How it stays cheap: x0 is not decoded by the VAE. An affine map from the 16 latent channels to RGB turns
each latent pixel into one image pixel (an image 1/8 the size a side, e.g. 128x128 for 1024x1024): one
small matrix product on the GPU, 49 KB copied to the host, a tiny image encoded. The map is fitted to this
VAE's own decodes (least squares over latent pixels and the decoded image shrunk by 8), from the warm-up
images and the first real ones, so it suits whatever VAE the pipeline has. Each preview's cost is
measured, and a preview is skipped when the previews of the image so far would pass `BUDGET` (5%) of
its elapsed time: the bound holds on any machine, not only where it was measured.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from PIL import Image

from ..model.shapes import VAE_SCALE

BUDGET = 0.05  # the previews of an image take at most this share of its time so far
FIT_IMAGES = 8  # images observed for the latent -> RGB map; after that it is fixed (it depends on the VAE)
RIDGE = 1e-4  # keeps the fit defined on a flat warm-up image


def preview_steps(steps: int, previews: int) -> list[int]:
    """Step indices (0-based, the callback's) after which a preview is made: spread evenly over the run,
    never after step 0 (no previous latents to read v from) nor after the last (the image itself follows).
    Fewer than asked when the run is short, as OpenAI allows."""
    if previews <= 0 or steps < 3:
        return []
    chosen = {min(max(round(steps * (k + 1) / (previews + 1)) - 1, 1), steps - 2) for k in range(previews)}
    return sorted(chosen)


def predicted_x0(latents: torch.Tensor, previous: torch.Tensor, sigma: float, previous_sigma: float) -> torch.Tensor:
    """The clean latents the model predicts at this step (see the module docstring)."""
    velocity = (latents.float() - previous.float()) / (sigma - previous_sigma)
    return latents.float() - sigma * velocity


class LatentPreviewer:
    """The affine latent -> RGB map, fitted from (final latents, decoded image) pairs; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._gram: np.ndarray | None = None  # X^T X and X^T Y of the least-squares fit
        self._cross: np.ndarray | None = None
        self._weights: torch.Tensor | None = None  # (channels + 1, 3)
        self._on_device: dict = {}
        self.images_seen = 0
        self.cost_estimate_s = 0.0  # the last preview's cost: how PreviewBudget judges an image's first

    @property
    def learning(self) -> bool:
        return self.images_seen < FIT_IMAGES

    def observe(self, latents: torch.Tensor, image: Image.Image) -> None:
        """Add one image's final latents (1, C, h, w) and its decoded picture to the fit."""
        if not self.learning:
            return
        x = latents[0].detach().float().cpu().numpy()  # (C, h, w)
        channels, height, width = x.shape
        if image.size != (width * VAE_SCALE, height * VAE_SCALE):
            return  # not this latent's image
        target = np.asarray(image.convert("RGB").resize((width, height), Image.BOX), dtype=np.float64) / 255.0
        inputs = np.concatenate([x.reshape(channels, -1).T.astype(np.float64), np.ones((height * width, 1))], axis=1)
        with self._lock:
            if self._gram is None or self._gram.shape[0] != channels + 1:
                self._gram, self._cross = np.zeros((channels + 1,) * 2), np.zeros((channels + 1, 3))
            self._gram += inputs.T @ inputs
            self._cross += inputs.T @ target.reshape(-1, 3)
            regularised = self._gram + RIDGE * np.trace(self._gram) / len(self._gram) * np.eye(len(self._gram))
            self._weights = torch.from_numpy(np.linalg.solve(regularised, self._cross)).float()
            self._on_device = {}
            self.images_seen += 1

    def render(self, x0: torch.Tensor) -> Image.Image:
        """The first image of `x0` (B, C, h, w) as an RGB picture of h x w pixels."""
        latent = x0[0].float()
        with self._lock:
            weights = self._weights
            if weights is not None and weights.shape[0] == latent.shape[0] + 1:
                weights = self._on_device.setdefault(latent.device, weights.to(latent.device))
            else:
                weights = None
        if weights is None:  # nothing fitted yet: the first three channels, stretched to the visible range
            rgb = latent[:3].permute(1, 2, 0)
            low, high = rgb.amin(), rgb.amax()
            rgb = (rgb - low) / (high - low).clamp_min(1e-6)
        else:
            rgb = torch.einsum("chw,cd->hwd", latent, weights[:-1]) + weights[-1]
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(pixels, "RGB")


class PreviewBudget:
    """Time spent on one image's previews against `BUDGET` of the image's elapsed time. A preview is made
    only if the time spent plus what one costs (the mean so far, else `estimate_s` from earlier images)
    stays within budget, so the first one is judged too."""

    def __init__(self, estimate_s: float = 0.0, clock=time.perf_counter):
        self.clock = clock
        self.started = clock()
        self.estimate_s = estimate_s
        self.spent_s = 0.0
        self.made = 0
        self.skipped = 0

    def allows(self) -> bool:
        cost = self.spent_s / self.made if self.made else self.estimate_s
        if self.spent_s + cost <= BUDGET * (self.clock() - self.started):
            return True
        self.skipped += 1
        return False

    def spend(self, seconds: float) -> None:
        self.spent_s += seconds
        self.made += 1
