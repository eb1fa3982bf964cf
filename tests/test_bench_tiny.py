"""`zimage-trt bench --tiny`: the benchmark script end to end on the tiny model (CPU), as a user runs it,
and its peers' plumbing (benchmark/phased.py): each peer in its own process, a missing one reported,
one past its --peer-timeout reported as not finished and ended, the bench going on either way.

The GPU figures in BENCHMARKS.md come from this script at full size; here it must run through, write
its JSON, and its PSNR figures must be the PSNR of the images it says it compared (--save-images)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_trt.benchmark import phased
from zimage_trt.benchmark.pipeline_speed import chosen_peers, peer_timeouts
from zimage_trt.benchmark.quality import psnr

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def worker(body: str) -> list[str]:
    """A phased worker whose prepare and measure are the given Python statements."""
    script = ("import sys, time\nfrom zimage_trt.benchmark import phased\n"
              f"def prepare():\n    {body}\n    return 1\n"
              "sys.exit(phased.run_worker(prepare, lambda state: {'value': 7}))\n")
    return [sys.executable, "-c", script]


def test_phased_jobs_report_ok_missing_failed_and_timeout_and_end_the_late_one(tmp_path):
    jobs = [
        phased.Job("fine", worker("pass"), env=ENV),
        phased.Job("missing", worker("phased.require('no_such_module_zimage')"), env=ENV),
        phased.Job("broken", worker("raise ValueError('planted')"), env=ENV),
        phased.Job("slow", worker("time.sleep(60)"), prepare_timeout_s=3, env=ENV),
    ]
    lines = []
    started = time.perf_counter()
    outcomes = phased.run_wave(jobs, tmp_path / "logs", report=lines.append)
    assert time.perf_counter() - started < 40  # the slow one was not waited for
    assert outcomes["fine"]["status"] == "ok" and outcomes["fine"]["value"] == 7 and outcomes["fine"]["prepare_s"] >= 0
    assert outcomes["missing"]["status"] == "missing" and "no_such_module_zimage" in outcomes["missing"]["detail"]
    assert outcomes["missing"]["exit_code"] == phased.MISSING_EXIT  # it stopped there, nothing measured
    assert outcomes["broken"]["status"] == "failed" and "ValueError: planted" in outcomes["broken"]["detail"]
    assert outcomes["slow"] == {"status": "timeout", "detail": "did not finish prepare in 3 s",
                                "elapsed_s": outcomes["slow"]["elapsed_s"]}
    assert any(line.startswith("slow: timeout: did not finish prepare in 3 s") for line in lines)
    assert "Traceback" in (tmp_path / "logs" / "broken.log").read_text()  # the child's output is kept


def test_peer_options_are_checked():
    assert peer_timeouts(None) == (600.0, {})
    assert peer_timeouts(["300", "torchao-fp8=120"]) == (300.0, {"torchao-fp8": 120.0})
    for bad in (["0"], ["torchao=10"], ["x=y"]):
        with pytest.raises(ValueError, match="--peer-timeout"):
            peer_timeouts(bad)
    assert chosen_peers("auto", "fp8") == ["diffusers-eager", "torchao-fp8"]
    assert chosen_peers("auto", "fp16") == ["diffusers-eager", "diffusers-compiled", "cache-dit"]
    with pytest.raises(ValueError, match="unknown"):
        chosen_peers("diffusers-eager,sglang", "fp16")


def load(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_bench_tiny_writes_its_figures_and_the_images_behind_its_psnr(tmp_path):
    env = dict(os.environ, **ENV)
    out = subprocess.run(
        [sys.executable, "-m", "zimage_trt.cli", "bench", "--tiny", "--precision", "fp32", "--out", str(tmp_path / "engines"),
         "--images", "2", "--peer-images", "1", "--batch", "1", "--skip-cold-start", "--skip-neighbour",
         "--json", str(tmp_path / "bench.json"), "--save-images", str(tmp_path / "images"),
         "--peers", "diffusers-eager,diffusers-compiled,torchao-fp8", "--peer-timeout", "diffusers-compiled=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["ours"]["per_image_ms"]["mean"] > 0 and results["diffusers_eager"]["mean"] > 0
    assert set(results["ours"]["stages"]) == {"text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms"}
    peers = results["peers"]
    assert peers["diffusers-compiled"]["status"] == "timeout"  # 1 s: not even its imports finish
    assert "did not finish prepare in 1 s" in out.stdout
    torchao = "ok" if importlib.util.find_spec("torchao") else "missing"
    assert peers["torchao-fp8"]["status"] in ({torchao} if torchao == "missing" else {"ok", "failed"})
    ours = load(tmp_path / "images" / "seed4321-ours-fp32.png")
    theirs = load(peers["diffusers-eager"]["quality_image"])
    assert ours.shape == theirs.shape == (256, 256, 3)
    # both 8-bit, PNG is lossless: the JSON figure is the PSNR of the saved pair
    assert psnr(ours, theirs) == pytest.approx(results["psnr_vs_diffusers_db"], abs=1e-6)
    assert results["psnr_vs_diffusers_db"] > 60  # fp32 engine vs diffusers on the same weights and seed
    assert peers["diffusers-eager"]["psnr_vs_eager_db"] == float("inf")  # the reference against itself


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
