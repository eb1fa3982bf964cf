"""The ControlNet on engines: a torch-compiled engine built without one serves one, and the kernels its
hint path compiled at first use are kept beside the engine, so that a fresh process compiles nothing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zimage_trt import ZImageTRTPipeline
from zimage_trt.engines import kept_artifacts
from zimage_trt.testing.tiny import make_tiny_controlnet, save_tiny_pipeline


@pytest.mark.slow  # (two CPU compiles of a tiny model, each in a fresh process)
def test_a_compiled_engine_built_without_a_controlnet_keeps_its_hint_path_kernels(tmp_path):
    """Both halves run in fresh processes with caches of their own, as a user's build-and-serve process and a
    later one elsewhere would: in a process that compiled the same tiny graphs before (another test's, under
    xdist), dynamo reuses them in memory, nothing is compiled or recorded, and the saved kernels lack them."""
    model = save_tiny_pipeline(tmp_path / "model", seed=0)
    engines = tmp_path / "engines"
    controlnet = make_tiny_controlnet(seed=3, variant="control_noise_refiner", control_in_dim=33)
    controlnet.save_pretrained(tmp_path / "controlnet")
    first_use = f"""
        import torch
        from zimage_trt import ZImageTRTControlNetPipeline, build_engines
        result = build_engines({str(model)!r}, "256x256", {str(engines)!r}, backend="torch-compiled", precision="fp32",
                               caption_capacity=64, progress=False)
        pipe = ZImageTRTControlNetPipeline.from_pretrained({str(model)!r}, engine_dir={str(engines)!r}, device='cpu',
                                                           torch_dtype=torch.float32,
                                                           controlnet={str(tmp_path / 'controlnet')!r})
        pipe.set_progress_bar_config(disable=True)
        pipe('a dancer', control_image=torch.rand(1, 3, 256, 256) * 2 - 1, num_inference_steps=2, output_type='latent')
        assert {{loop.engine.kind for loop in pipe._loops.values()}} == {{"torch-compiled"}}
        print('ENGINE', result.manifest.name, result.manifest.files[0].sha256)
    """
    out = run_fresh(first_use, tmp_path / "first")
    name, sha = out.split("ENGINE")[1].split()
    prefix, identity = f"controlnet-{name}-", {"engine": sha}
    keys = kept_artifacts.saved_keys(engines, prefix, identity)
    assert len(keys) == 1 and keys[0].endswith("-256x256-b1"), sorted(p.name for p in engines.iterdir())
    record = json.loads(kept_artifacts.record_path(kept_artifacts.artifact_path(engines, prefix, keys[0])).read_text())
    assert record["engine"] == identity["engine"] and record["torch"] == torch.__version__
    assert not [p for p in engines.iterdir() if p.name.startswith(".controlnet-")]  # no staged leftovers
    later = f"""
        import torch
        from torch._dynamo.utils import counters
        from zimage_trt import ZImageTRTControlNetPipeline
        pipe = ZImageTRTControlNetPipeline.from_pretrained({str(model)!r}, engine_dir={str(engines)!r}, device='cpu',
                                                           torch_dtype=torch.float32,
                                                           controlnet={str(tmp_path / 'controlnet')!r})
        pipe.set_progress_bar_config(disable=True)
        pipe('a dancer', control_image=torch.rand(1, 3, 256, 256) * 2 - 1, num_inference_steps=2, output_type='latent')
        print('HITS', counters['inductor']['fxgraph_cache_hit'], 'MISSES', counters['inductor']['fxgraph_cache_miss'])
    """
    out = run_fresh(later, tmp_path / "later")
    hits, misses = (int(v) for v in out.split("HITS")[1].split("MISSES"))
    assert hits >= 1 and misses == 0, out


def run_fresh(script: str, caches) -> str:
    """`script` in a new Python process whose compile caches start empty; returns what it printed."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=900,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_text_to_image_steps_pass_no_controlnet_and_no_blend(tmp_path):
    """Text to image pays nothing for the tasks: its steps call the engine without `control` and its slot
    holds no blend or ControlNet buffers."""
    pipe = ZImageTRTPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "model", seed=0), device="cpu",
                                             torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe("a fox", height=256, width=256, num_inference_steps=2, output_type="latent")
    (loop,) = {id(l): l for l in pipe._loops.values()}.values()
    original = loop.engine.run
    loop.engine.run = lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs)
    pipe("a fox", height=256, width=256, num_inference_steps=2, output_type="latent")
    assert calls and all("control" not in kw and kw.get("controlnet_hints") is None for kw in calls)
    assert all(slot.blend is None and slot.control is None for slot in loop._slots.values())
