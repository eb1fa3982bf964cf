"""bench/speed3.py --tiny: the one-device-call Speed III script run through on the CPU with the tiny
model, as its test: every job in its own process, the missing peers (cache-dit, torchao: not installed
in CI) reported while the rest goes on, the PSNR figures those of the saved images, the JSON and log written."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_trt.benchmark.quality import psnr

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed3_tiny_runs_every_job_and_reports_the_missing_ones(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speed3.py"), "--tiny", "--out", str(tmp_path / "s3")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "s3" / "speed3.json").read_text())
    jobs = results["jobs"]
    for name in ("ours-fp8", "ours-fp16", "ours-fp8-switches", "diffusers-eager", "diffusers-compiled"):
        assert jobs[name]["status"] == "ok", (name, jobs[name])
        assert jobs[name]["per_image_ms"]["count"] >= 1 and jobs[name]["prepare_s"] >= 0
    assert set(jobs["ours-fp16"]["stages"]) == {"text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms"}
    for name, module in (("cache-dit", "cache_dit"), ("torchao-fp8", "torchao")):
        if importlib.util.find_spec(module) is None:
            assert jobs[name]["status"] == "missing" and module in jobs[name]["detail"]
    assert jobs["vae-probe"]["status"] == "ok" and (tmp_path / "s3" / "vae_probe.json").exists()
    eager = np.asarray(Image.open(jobs["diffusers-eager"]["quality_image"]))
    ours = np.asarray(Image.open(jobs["ours-fp16"]["quality_image"]))
    assert jobs["ours-fp16"]["psnr_vs_eager_db"] == pytest.approx(psnr(ours, eager), abs=1e-9)
    assert jobs["diffusers-eager"]["psnr_vs_eager_db"] == float("inf")
    log = (tmp_path / "s3" / "speed3.log").read_text()
    assert "Speed III summary" in log and "ours-fp8-switches" in log
    assert (tmp_path / "s3" / "logs" / "ours-fp16.log").exists()
