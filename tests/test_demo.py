"""`make demo`: tiny random model -> engines -> an image that came through an engine, checked against diffusers."""

import json

import pytest
from PIL import Image

from zimage_trt.demo import DEMO_SIZE, demo


@pytest.mark.slow
def test_demo_image_comes_through_the_compiled_engine_and_matches_diffusers(tmp_path):
    summary = demo(tmp_path, seed=0, tensorrt_rtx=False)  # (the TensorRT-RTX build has tests of its own)
    assert summary["image_engine"] == "torch-compiled"  # not the eager fallback: the pipeline allows none
    assert summary["torch_compiled_engine"]["manifest"].endswith(".json")
    # fp32 engine vs diffusers' fp32 pipeline: compiled kernels round differently, a pixel level at most.
    assert summary["max_abs_pixel_diff_vs_diffusers"] <= 1 / 255 + 1e-6
    with Image.open(summary["image"]) as image:
        assert image.size == (DEMO_SIZE, DEMO_SIZE)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
