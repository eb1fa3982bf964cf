"""PSNR, SSIM and the difference picture (benchmark/quality.py) against values known independently:
closed forms, and scikit-image 0.26's `structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)` recorded for two fixed images (scikit-image is not a
dependency here; its figures were computed once and are written below)."""

import math

import numpy as np
import pytest

from zimage_trt.benchmark import quality


def noisy_pair():
    rng = np.random.default_rng(0)  # PCG64: the same stream on every numpy
    a = rng.random((40, 37, 3))
    return a, np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)


def test_identical_images_give_infinite_psnr_and_ssim_one():
    a, _ = noisy_pair()
    assert quality.psnr(a, a) == math.inf and quality.ssim(a, a) == 1.0
    eight = np.round(a * 255).astype(np.uint8)
    assert quality.psnr(eight, eight) == math.inf and quality.ssim(eight, eight) == 1.0


def test_psnr_closed_forms():
    a = np.full((16, 16, 3), 0.5)
    assert quality.psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01 with peak 1
    one = np.full((8, 8, 3), 100, dtype=np.uint8)
    assert quality.psnr(one, one + 1) == pytest.approx(20 * math.log10(255))  # one 8-bit step everywhere


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # no variance, no covariance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) exactly
    c1 = (0.01 * 1) ** 2
    a, b = np.full((20, 24), 0.3), np.full((20, 24), 0.6)
    assert quality.ssim(a, b) == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1), rel=1e-12)


def test_ssim_matches_scikit_image_on_recorded_cases():
    a, b = noisy_pair()
    assert quality.ssim(a, b) == pytest.approx(0.9456507580439415, abs=1e-10)  # RGB: mean of the channels
    step = np.zeros((20, 20))
    step[:, 10:] = 1
    assert quality.ssim(step, step * 0.8 + 0.1) == pytest.approx(0.7528370962986923, abs=1e-10)


def test_the_window_is_wang_et_al_s_and_bad_input_is_refused():
    taps = quality.gaussian_window()
    assert len(taps) == 11 and taps.sum() == pytest.approx(1.0) and taps[5] == taps.max()
    with pytest.raises(ValueError, match="different shapes"):
        quality.psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        quality.ssim(np.zeros((8, 8)), np.ones((8, 8)))
    with pytest.raises(TypeError, match="uint8"):
        quality.psnr(np.zeros((4, 4), dtype=np.int32), np.zeros((4, 4), dtype=np.int32))


def test_difference_image_is_magnified_and_8_bit():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0] = 10
    diff = quality.difference_image(a, b, magnify=8)
    assert diff.dtype == np.uint8 and diff.shape == (4, 4, 3)
    assert diff[0, 0, 0] == 80 and diff[1:].max() == 0
    assert quality.difference_image(a, b + 40, magnify=8).max() == 255  # clipped
