"""The offline demo: a tiny random Z-Image model in diffusers format -> engines -> an image.

Runs anywhere (CPU is fine, no network): it makes the model, builds a TensorRT-RTX engine when
`tensorrt_rtx` is installed (on a machine where that engine cannot run, it is still built and its
manifest checked), generates an image through `ZImageTRTPipeline`, checks it against diffusers'
`ZImagePipeline` on the same weights and seed, and writes the image and a timing summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import ZImagePipeline

from .compiler.build import build_engines
from .engines.manifest import Manifest
from .engines.tensorrt.library import available_flavors
from .pipeline import ZImageTRTPipeline
from .testing.tiny import save_tiny_pipeline

DEMO_SIZE = 256


def demo(out: Path, seed: int = 0, prompt: str = "a red fox in fresh snow at dawn") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu"}

    start = time.perf_counter()
    model_dir = save_tiny_pipeline(out / "tiny-z-image", seed=seed)
    summary["model"] = str(model_dir)
    summary["model_s"] = round(time.perf_counter() - start, 2)

    engine_dir = out / "engines"
    rtx_available, rtx_why = available_flavors()["tensorrt-rtx"]
    if rtx_available:
        built = build_engines(model_dir, [f"{DEMO_SIZE}x{DEMO_SIZE}"], engine_dir, backend="tensorrt-rtx",
                              precision="fp16", caption_capacity=512, progress=True)
        Manifest.read(built.manifest_path).verify_files(engine_dir)
        summary["tensorrt_rtx_engine"] = {
            "manifest": str(built.manifest_path), "bytes": built.manifest.files[0].bytes,
            "compute_capabilities": built.manifest.compute_capabilities, "build_s": round(built.seconds, 2),
        }
    else:
        summary["tensorrt_rtx_engine"] = f"not built: {rtx_why} (pip install tensorrt-rtx-cu13)"

    # The engine built above runs only on RTX-class GPUs; here the static denoiser runs in eager torch
    # (on CUDA it would be the compiled engine: `zimage-trt build --backend torch-compiled`).
    pipe = ZImageTRTPipeline.from_pretrained(model_dir, engine_dir=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    result = pipe(prompt, height=DEMO_SIZE, width=DEMO_SIZE, generator=generator)
    image_path = out / "demo.png"
    result.images[0].save(image_path)
    summary["image"] = str(image_path)
    summary["timings_ms"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.timings.as_dict().items()
                             if k in ("text_encode_ms", "denoise_ms", "vae_decode_ms", "total_ms")}

    reference = ZImagePipeline.from_pretrained(model_dir, torch_dtype=torch.float32).to(pipe.device)
    reference.set_progress_bar_config(disable=True)
    ref = reference(prompt, height=DEMO_SIZE, width=DEMO_SIZE, num_inference_steps=8, guidance_scale=0.0,
                    generator=torch.Generator(pipe.device).manual_seed(seed), output_type="np").images[0]
    ours = np.asarray(result.images[0], dtype=np.float32) / 255.0
    summary["max_abs_pixel_diff_vs_diffusers"] = round(float(np.abs(ours - ref).max()), 5)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
