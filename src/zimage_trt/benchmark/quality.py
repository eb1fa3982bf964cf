"""How far apart two images are: PSNR, SSIM, and a magnified difference picture.

Images are 8-bit RGB (PIL images or uint8 arrays [H, W, 3]) or float arrays in [0, 1]; both sides are
compared on the [0, 1] scale (8-bit values / 255), so the figures of an 8-bit pair are those of the
saved PNGs.

SSIM is Wang, Bovik, Sheikh and Simoncelli's (IEEE TIP 2004): local means, variances and covariance
under an 11 x 11 Gaussian window (sigma 1.5, normalised to sum 1), constants C1 = (0.01 L)^2 and
C2 = (0.03 L)^2 with L = 1 (the data range), the map averaged over the positions where the window fits
inside the image ("valid"), and for RGB the mean of the three channels' SSIM. That is scikit-image's
`structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=-1)`; it is written out here (a separable filter in numpy) because
scikit-image is not among this package's dependencies.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: scikit-image's int(3.5 * sigma + 0.5) for sigma 1.5, Wang et al.'s 11 x 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def as_unit_float(image) -> np.ndarray:
    """[H, W, C] float64 in [0, 1] from a PIL image, a uint8 array (/ 255) or a float array (as is)."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"an image is uint8 (0-255) or float (0-1); got {array.dtype}")
    return array.astype(np.float64)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_unit_float(a), as_unit_float(b)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape} cannot be compared")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return a, b


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (peak 1 on the [0, 1] scale); inf for identical images."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """The 1-D Gaussian taps (sum 1); the 2-D window is their outer product."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D filter of [H, W] with `taps` on both axes, only where the window fits (valid)."""
    rows = np.apply_along_axis(lambda r: np.convolve(r, taps, mode="valid"), 1, image)
    return np.apply_along_axis(lambda c: np.convolve(c, taps, mode="valid"), 0, rows)


def ssim_map(a: np.ndarray, b: np.ndarray, taps: np.ndarray | None = None) -> np.ndarray:
    """The SSIM map of two [H, W] float images in [0, 1] (valid positions only)."""
    taps = gaussian_window() if taps is None else taps
    if min(a.shape) < len(taps):
        raise ValueError(f"SSIM needs images of at least {len(taps)} x {len(taps)} pixels; got {a.shape}")
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a ** 2
    var_b = _filter_valid(b * b, taps) - mu_b ** 2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(a, b) -> float:
    """Mean SSIM (1 for identical images), averaged over the channels of an RGB pair."""
    a, b = _pair(a, b)
    if np.array_equal(a, b):
        return 1.0  # exactly: the map's terms are x/x, which rounding may put a hair off 1
    return float(np.mean([ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[-1])]))


def difference_image(a, b, magnify: float = 8.0) -> np.ndarray:
    """|a - b| x magnify as an 8-bit RGB array (black where the images agree)."""
    a, b = _pair(a, b)
    diff = np.clip(np.abs(a - b) * magnify, 0.0, 1.0)
    if diff.shape[-1] == 1:
        diff = np.repeat(diff, 3, axis=-1)
    return np.round(diff * 255).astype(np.uint8)


def to_8bit(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image or an array (floats in [0, 1] rounded as diffusers' numpy_to_pil)."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)


def load_rgb(path) -> np.ndarray:
    """uint8 [H, W, 3] of the image file at `path` (converted to RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
