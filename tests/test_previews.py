"""Partial images and links, piece by piece: which steps preview, the x0 prediction, the latent -> RGB map,
the 5% budget, and the image store behind `response_format: "url"`."""

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_trt.serving import previews
from zimage_trt.serving.image_store import ImageStore
from zimage_trt.serving.previews import LatentPreviewer, PreviewBudget, predicted_x0, preview_steps


def test_preview_steps_spread_over_the_run_and_skip_the_first_and_last():
    assert preview_steps(8, 3) == [1, 3, 5]  # after steps 2, 4 and 6 of 8
    assert preview_steps(4, 2) == [1, 2]
    assert preview_steps(8, 1) == [3]
    assert preview_steps(3, 3) == [1]  # fewer than asked on a short run, as OpenAI allows
    assert preview_steps(2, 3) == [] and preview_steps(8, 0) == []
    for steps in range(3, 30):
        chosen = preview_steps(steps, 3)
        assert chosen and all(1 <= i <= steps - 2 for i in chosen)


def test_x0_is_exact_on_a_straight_flow():
    # On x_s = (1 - s) x0 + s noise the velocity is constant (noise - x0) and the loop's Euler step is exact,
    # so two consecutive latents give x0 back (to float32 rounding).
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 16, 8, 8, generator=generator)
    at = lambda s: (1 - s) * x0 + s * noise  # noqa: E731
    assert torch.allclose(predicted_x0(at(0.6), at(0.8), 0.6, 0.8), x0, atol=1e-5)
    assert torch.allclose(predicted_x0(at(0.0), at(0.3), 0.0, 0.3), at(0.0), atol=1e-6)  # the last step: the image


def affine_vae(latents: torch.Tensor, weights: np.ndarray, bias: np.ndarray) -> Image.Image:
    """A stand-in VAE that is exactly affine per latent pixel, each pixel 8x8 in the image."""
    rgb = np.einsum("chw,cd->hwd", latents[0].numpy(), weights) + bias
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")
    return image.resize((image.width * 8, image.height * 8), Image.NEAREST)


def test_the_latent_to_rgb_map_is_fitted_to_the_vaes_own_decodes():
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(0, 0.03, (16, 3)), np.array([0.5, 0.45, 0.4])  # (inside 0..1: no clipping)
    latents = torch.from_numpy(rng.normal(0, 1, (1, 16, 24, 16))).float()
    previewer = LatentPreviewer()
    unfitted = previewer.render(latents)
    assert unfitted.size == (16, 24)  # latent resolution, width x height
    previewer.observe(latents, affine_vae(latents, weights, bias))
    assert previewer.images_seen == 1
    other = torch.from_numpy(rng.normal(0, 1, (1, 16, 24, 16))).float()
    # An affine decoder is recovered up to the 8-bit rounding of its image (and the tiny ridge term).
    expected = np.asarray(affine_vae(other, weights, bias).resize((16, 24), Image.BOX), dtype=np.int16)
    assert np.abs(np.asarray(previewer.render(other), dtype=np.int16) - expected).max() <= 2
    previewer.observe(latents, Image.new("RGB", (10, 10)))  # not this latent's image: ignored
    assert previewer.images_seen == 1


def test_the_budget_bounds_previews_to_five_percent_of_the_time_so_far():
    now = [0.0]
    budget = PreviewBudget(estimate_s=0.0, clock=lambda: now[0])
    now[0] = 1.0
    assert budget.allows()
    budget.spend(0.04)
    assert not budget.allows() and budget.skipped == 1  # 0.04 spent + 0.04 more > 5% of 1 s
    now[0] = 2.0
    assert budget.allows()  # 0.08 <= 5% of 2 s
    # The first preview of an image is judged by what one cost before.
    now[0] = 0.0
    fresh = PreviewBudget(estimate_s=0.5, clock=lambda: now[0])
    now[0] = 1.0
    assert not fresh.allows()
    assert previews.BUDGET == 0.05


def test_the_image_store_is_an_lru_with_a_time_to_live():
    now = [0.0]
    store = ImageStore(max_images=2, ttl_s=10.0, max_bytes=100, clock=lambda: now[0])
    a, b = store.put(b"a" * 10, "image/png"), store.put(b"b" * 10, "image/jpeg")
    assert a.endswith(".png") and b.endswith(".jpeg") and a != b and len(a) > 20  # random names
    assert store.get(a).data == b"a" * 10  # a is now the most recently used
    c = store.put(b"c" * 10, "image/webp")
    assert store.get(b) is None and store.get(a) is not None and store.get(c) is not None  # b went first
    store.put(b"d" * 91, "image/png")  # the count bound drops a, the bytes bound c
    assert len(store) == 1
    now[0] = 10.0
    assert len(store) == 0  # past its time
    with pytest.raises(ValueError, match="over the store's 100 bytes"):
        store.put(b"x" * 101, "image/png")
    with pytest.raises(RuntimeError, match="keeps no images"):
        ImageStore(max_images=0).put(b"x", "image/png")


@pytest.mark.gpu
def test_previews_on_the_gpu_match_the_cpu():
    """x0 and the fitted map on CUDA tensors give the CPU's picture (float32 on both: within one level,
    for rounding at .5 boundaries after differently ordered sums)."""
    rng = np.random.default_rng(1)
    weights, bias = rng.normal(0, 0.03, (16, 3)), np.array([0.5, 0.45, 0.4])
    latents = torch.from_numpy(rng.normal(0, 1, (1, 16, 32, 48))).float()
    previous = latents + torch.from_numpy(rng.normal(0, 0.1, (1, 16, 32, 48))).float()
    previewer = LatentPreviewer()
    previewer.observe(latents, affine_vae(latents, weights, bias))
    on_cpu = previewer.render(predicted_x0(latents, previous, 0.5, 0.6))
    on_gpu = previewer.render(predicted_x0(latents.cuda(), previous.cuda(), 0.5, 0.6))
    assert on_gpu.size == on_cpu.size == (48, 32)
    assert np.abs(np.asarray(on_gpu, dtype=np.int16) - np.asarray(on_cpu, dtype=np.int16)).max() <= 1
