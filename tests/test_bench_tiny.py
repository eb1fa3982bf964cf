"""`zimage-trt bench --tiny`: the benchmark script end to end on the tiny model (CPU), as a user runs it.

The GPU figures in BENCHMARKS.md come from this script at full size; here it must run through, write
its JSON, and its PSNR figure must be the PSNR of the two images it says it compared (--save-images)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.slow
def test_bench_tiny_writes_its_figures_and_the_images_behind_its_psnr(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "zimage_trt.cli", "bench", "--tiny", "--precision", "fp32", "--out", str(tmp_path / "engines"),
         "--images", "2", "--peer-images", "1", "--batch", "1", "--skip-cold-start", "--skip-neighbour",
         "--json", str(tmp_path / "bench.json"), "--save-images", str(tmp_path / "images")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["ours"]["per_image_ms"]["mean"] > 0 and results["diffusers_eager"]["mean"] > 0
    assert set(results["ours"]["stages"]) == {"text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms"}
    ours = np.asarray(Image.open(tmp_path / "images" / "seed101-ours-fp32.png"), dtype=np.float64) / 255
    theirs = np.asarray(Image.open(tmp_path / "images" / "seed101-diffusers-bf16.png"), dtype=np.float64) / 255
    assert ours.shape == theirs.shape == (256, 256, 3)
    mse = np.mean((ours - theirs) ** 2)
    psnr = 10 * np.log10(1 / mse) if mse > 0 else float("inf")
    # both 8-bit, PNG is lossless: the JSON figure is the PSNR of the saved pair (bar float32 sums)
    assert psnr == pytest.approx(results["psnr_vs_diffusers_db"], abs=1e-3)
    assert results["psnr_vs_diffusers_db"] > 60  # fp32 engine vs diffusers on the same weights and seed


@pytest.mark.slow
def test_image_tasks_bench_tiny_writes_its_json_and_log(tmp_path):
    """bench/image_tasks.py --tiny: every setting runs, image to image runs the steps its strength leaves,
    f and the targets are computed and written."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = Path(__file__).resolve().parents[1] / "bench" / "image_tasks.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--images", "1",
                          "--peer-images", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "image_tasks.json").read_text())
    assert results["ours_image_to_image"]["steps"] == 5 and results["ours_text_to_image"]["steps"] == 8
    assert results["ours_image_to_image"]["vae_encode_ms"]["mean"] > 0
    assert 0 < results["flops"]["f"] and "step_target_met" in results["ours_controlnet"]
    assert results["diffusers_controlnet_eager"]["per_image_ms"]["mean"] > 0
    log = (tmp_path / "image_tasks.log").read_text()
    assert "f = " in log and "ours ControlNet" in log
