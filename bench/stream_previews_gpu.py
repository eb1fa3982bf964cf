"""What OpenAI-style streaming previews (`stream: true`, `partial_images`) cost on a GPU; target <= 5% of an
image's time.

    python bench/stream_previews_gpu.py --out DIR                      # full-size random weights, bf16, 1024x1024
    python bench/stream_previews_gpu.py --tiny --device cpu --out DIR  # the same flow on the tiny model

For partial_images 0 and then 3, `--images` streaming requests one after another through
`ImageService.stream` (the service as the HTTP app runs it, without HTTP): per-image ms (the pipeline's
own timings), the previews' own time (timings.preview_ms: x0, the latent -> RGB map, the host copy, the
encoding), previews made and skipped, and the ratio of the two modes' per-image times. Writes
DIR/stream_previews.json (and DIR/preview_last.png, DIR/image_last.png), prints one line per mode and
exits non-zero if the previews took more than 5% of the images' time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import torch

from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.serving.schema import ServingLimits, request_model
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.testing.tiny import make_tiny_components

PROMPT = "a red fox in the snow at dawn, photograph"


async def run_mode(service, model, args, size: str, partial_images: int, out: Path) -> dict:
    per_image, preview_ms, made, skipped, wall = [], 0.0, 0, 0, []
    for seed in range(args.images):
        req = model.model_validate({"prompt": PROMPT, "size": size, "seed": seed, "stream": True,
                                    "partial_images": partial_images, "num_inference_steps": args.steps})
        started = time.perf_counter()
        async for event in service.stream(req, progress=False):
            if event.event == "partial_image":
                (out / "preview_last.png").write_bytes(base64.b64decode(event.data["b64_json"]))
            elif event.event == "done":
                timings = event.data.timings
                per_image += timings["per_image_ms"]
                preview_ms += timings.get("preview_ms", 0.0)
                made += timings.get("previews", 0)
                skipped += timings.get("previews_skipped", 0)
                (out / "image_last.png").write_bytes(event.data.images[0])
            elif event.event == "error":
                raise SystemExit(f"request failed: {event.data.status} {event.data.message}")
        wall.append((time.perf_counter() - started) * 1000.0)
    return {"partial_images": partial_images, "per_image_ms": summarize(per_image), "request_ms": summarize(wall),
            "preview_ms_total": preview_ms, "previews_made": made, "previews_skipped": skipped,
            "preview_share": preview_ms / sum(per_image)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for stream_previews.json and the last preview/image")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model instead of full-size random weights")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: 1024x1024, 256x256 with --tiny)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps")
    ap.add_argument("--images", type=int, default=5, help="images per mode")
    ap.add_argument("--engine-dir", default=None, help="built engines (default: the eager static denoiser)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or ("256x256" if args.tiny else "1024x1024")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        parts = make_tiny_components(seed=0)
    else:
        from zimage_trt.benchmark.common import full_size_components

        parts = full_size_components(device, dtype)
    pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=args.engine_dir, device=device, torch_dtype=dtype)
    limits = ServingLimits(sizes=(size,))
    service = ImageService(pipe, ServiceSettings(limits=limits))
    started = time.perf_counter()
    service.start(background=False)  # loads nothing (a pipeline is given); warms the size, fits the previewer
    if not service.ready:
        raise SystemExit(f"service failed: {service.failure}")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": size, "steps": args.steps, "images": args.images,
              "engine_dir": args.engine_dir, "warm_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
    model = request_model(limits)

    async def both():
        await run_mode(service, model, args, size, 0, out)  # one untimed round: allocator, graphs
        return [await run_mode(service, model, args, size, k, out) for k in (0, 3)]

    try:
        plain, previewed = asyncio.run(both())
    finally:
        service.close()
    result["modes"] = [plain, previewed]
    result["per_image_ratio"] = previewed["per_image_ms"]["mean"] / plain["per_image_ms"]["mean"]
    result["checks"] = {"previews_within_5pct": previewed["preview_share"] <= 0.05,
                        "previews_made": previewed["previews_made"] > 0}
    for mode in result["modes"]:
        print(f"partial_images={mode['partial_images']}: {mode['per_image_ms']['mean']:.1f} ms/image "
              f"(p95 {mode['per_image_ms']['p95']:.1f}), previews {mode['previews_made']} made / "
              f"{mode['previews_skipped']} skipped, {mode['preview_ms_total']:.1f} ms = "
              f"{100 * mode['preview_share']:.2f}% of image time", flush=True)
    print(f"per-image time with previews / without: {result['per_image_ratio']:.3f}", flush=True)
    (out / "stream_previews.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
