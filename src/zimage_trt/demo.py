"""The offline demo: a tiny random Z-Image model in diffusers format -> engines -> an image.

Runs anywhere (CPU is fine, no network): it makes the model, builds a torch-compiled engine for this
machine (on the CPU too: TorchInductor compiles for it), generates the image through that engine with
`ZImageTRTPipeline` (no eager fallback: a missing engine is an error), checks the image against
diffusers' `ZImagePipeline` on the same weights and seed, and writes the image and a summary. fp32
throughout, so that the comparison with diffusers measures the engine, not a precision.

With `tensorrt_rtx` installed it also builds a TensorRT-RTX engine (`tensorrt_rtx=False` skips it):
such an engine runs on RTX-class GPUs only, so elsewhere it is built and its manifest checked.
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
from .model.shapes import Resolution
from .pipeline import ZImageTRTPipeline
from .testing.tiny import save_tiny_pipeline

DEMO_SIZE = 256


def demo(out: Path, seed: int = 0, prompt: str = "a red fox in fresh snow at dawn",
         tensorrt_rtx: bool | None = None) -> dict:
    """`tensorrt_rtx`: also build a TensorRT-RTX engine; None: when the library is installed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu"}

    start = time.perf_counter()
    model_dir = save_tiny_pipeline(out / "tiny-z-image", seed=seed)
    summary["model"] = str(model_dir)
    summary["model_s"] = round(time.perf_counter() - start, 2)

    engine_dir = out / "engines"
    compiled = build_engines(model_dir, [f"{DEMO_SIZE}x{DEMO_SIZE}"], engine_dir, backend="torch-compiled",
                             precision="fp32", caption_capacity=512, progress=True)
    Manifest.read(compiled.manifest_path).verify_files(engine_dir)
    summary["torch_compiled_engine"] = {"manifest": str(compiled.manifest_path), "build_s": round(compiled.seconds, 2)}

    rtx_available, rtx_why = available_flavors()["tensorrt-rtx"]
    if tensorrt_rtx is False:
        summary["tensorrt_rtx_engine"] = "not built (asked not to)"
    elif rtx_available:
        built = build_engines(model_dir, [f"{DEMO_SIZE}x{DEMO_SIZE}"], engine_dir, backend="tensorrt-rtx",
                              precision="fp16", caption_capacity=512, progress=True)
        Manifest.read(built.manifest_path).verify_files(engine_dir)
        summary["tensorrt_rtx_engine"] = {
            "manifest": str(built.manifest_path), "bytes": built.manifest.files[0].bytes,
            "compute_capabilities": built.manifest.compute_capabilities, "build_s": round(built.seconds, 2),
        }
    else:
        summary["tensorrt_rtx_engine"] = f"not built: {rtx_why} (pip install tensorrt-rtx-cu13)"

    # The image comes through the torch-compiled engine (the pipeline picks the fp32 engine it finds for
    # this machine; the TensorRT-RTX one is fp16, for RTX-class GPUs).
    pipe = ZImageTRTPipeline.from_pretrained(model_dir, engine_dir=engine_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    result = pipe(prompt, height=DEMO_SIZE, width=DEMO_SIZE, generator=generator)
    engine = pipe.denoise_loop(Resolution(DEMO_SIZE, DEMO_SIZE), images=1, cfg=False).engine
    summary["image_engine"] = engine.kind
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
