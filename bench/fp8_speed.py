"""FP8 (e4m3 projections, bf16 elsewhere) against bf16, end to end, on one GPU.

Full-size architecture, random weights, 1024x1024, 8 steps. Reports the fp8 pipeline's per-image and
per-step time, peak memory, and its deviation from the bf16 pipeline on the same weights and seed,
first with the text encoder in bf16, then with it in FP8 too (the default for precision="fp8")
(relative L2 of the final latents, PSNR of the images). On random weights the deviation says little
about image quality: real checkpoints have structure (outlier channels) that random ones lack.

    python bench/fp8_speed.py --out /tmp/eng8 --json fp8.json
"""

import argparse
import json
import time

import torch

from zimage_trt import ZImageTRTPipeline, build_engines
from zimage_trt.benchmark import quality
from zimage_trt.benchmark.common import PROMPT_160, environment, timed_images

from zimage_trt.benchmark.pipeline_speed import components, row
from zimage_trt.runtime.telemetry import summarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engines/bench-fp8")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    side = 256 if args.tiny else 1024
    size = {"height": side, "width": side}
    results = {"env": environment()}
    print(results["env"], flush=True)
    parts = components(args.tiny, device, torch.bfloat16)
    if args.tiny:
        for key in ("transformer", "vae", "text_encoder"):
            torch.nn.Module.to(parts[key], torch.bfloat16)

    # bf16 reference first: the fp8 engine converts the transformer's projections in place.
    reference = ZImageTRTPipeline.from_components(**parts, engine_dir=None, device=device, torch_dtype=torch.bfloat16,
                                                  compile_vae=False)
    reference.set_progress_bar_config(disable=True)
    seed = 1234
    ref_latents = reference(PROMPT_160, generator=torch.Generator(device).manual_seed(seed), output_type="latent", **size).images
    ref_image = reference.decode_latents(ref_latents, "np")[0]
    del reference

    start = time.perf_counter()
    build_engines(parts["transformer"], [f"{side}x{side}"], args.out, backend="torch-compiled", precision="fp8",
                  caption_capacity=512 if not args.tiny else 64, progress=False)
    results["build_s"] = time.perf_counter() - start
    print(f"fp8 engine build: {results['build_s']:.1f}s", flush=True)

    # First the FP8 denoiser alone (text encoder bf16), then with the FP8 text encoder too (the
    # pipeline's default for precision="fp8"; it converts the shared text encoder in place).
    for te_fp8 in (False, True):
        label = "fp8 denoiser + fp8 text encoder" if te_fp8 else "fp8 denoiser, bf16 text encoder"
        pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=args.out, device=device, torch_dtype=torch.bfloat16,
                                                 precision="fp8", text_encoder_fp8=te_fp8)
        pipe.set_progress_bar_config(disable=True)
        res = results[label] = {}
        if device == "cuda":
            torch.cuda.empty_cache()  # (benchmark only: measure this variant's own peak)
            torch.cuda.reset_peak_memory_stats()
        lat = pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(seed), output_type="latent", **size).images
        res["rel_l2_latents_vs_bf16"] = float((lat.float() - ref_latents.float()).norm() / ref_latents.float().norm())
        image = pipe.decode_latents(lat, "np")[0]
        res["psnr_vs_bf16_db"] = quality.psnr(image, ref_image)
        print(f"{label} vs bf16, same weights and seed: latents rel L2 {res['rel_l2_latents_vs_bf16']:.3e}, "
              f"image PSNR {res['psnr_vs_bf16_db']:.1f} dB", flush=True)
        timed_images(pipe, 1, **size)
        pipe.telemetry.clear()
        times, _ = timed_images(pipe, args.images, **size)
        res["per_image_ms"] = summarize(times)
        stats = pipe.stats()
        res["step_ms"] = stats["step_ms"]
        res["stages"] = {k: stats[k]["mean"] for k in ("text_encode_ms", "denoise_ms", "vae_decode_ms")}
        if device == "cuda":
            res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(row(f"ours {label}", res["per_image_ms"]), flush=True)
        print(f"  step mean {stats['step_ms']['mean']:.2f} ms (cv {100 * stats['step_ms']['cv']:.2f}%), stages "
              f"{res['stages']}, peak allocated {res.get('peak_allocated_gib', 0):.1f} GiB", flush=True)
        del pipe
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
