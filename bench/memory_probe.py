"""Peak GPU memory of the pipeline at 1024x1024, in a fresh process (no build in it), stage by stage.

Full-size random weights are made directly in their dtype on the GPU (and moved to the CPU with
--components-on cpu, where from_pretrained loads them), then the peaks are reset. Reported: allocated (by tensors) and reserved (what the process
holds from the GPU, CUDA graph pools included: what must fit the card) after loading, through text
encoding, denoising and decoding of the first image (engine opening, FP8 conversion, compilation),
then the peaks of steady generation.

    python bench/memory_probe.py --engine-dir /tmp/eng --precision fp16 [--build]
"""

import argparse
import json
import subprocess
import sys

import torch

GIB = 2**30


def snapshot(label, rows):
    torch.cuda.synchronize()
    rows[label] = dict(allocated=torch.cuda.memory_allocated() / GIB, reserved=torch.cuda.memory_reserved() / GIB,
                       peak_allocated=torch.cuda.max_memory_allocated() / GIB,
                       peak_reserved=torch.cuda.max_memory_reserved() / GIB)
    print(f"{label:<34} " + "  ".join(f"{k} {v:6.2f}" for k, v in rows[label].items()) + "  GiB", flush=True)


def measure(args):
    from zimage_trt import ZImageTRTPipeline
    from zimage_trt.benchmark.common import PROMPT_160, full_size_components

    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    parts = full_size_components("cuda", dtype)  # (made on the GPU: random init on the CPU takes minutes)
    if args.components_on == "cpu":
        for key in ("transformer", "text_encoder", "vae"):
            parts[key].cpu()
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rows = {}
    snapshot(f"weights on the {args.components_on}", rows)
    options = {"precision": "fp8"} if args.precision == "fp8" else {}
    if args.text_encoder_fp8 != "auto":
        options["text_encoder_fp8"] = args.text_encoder_fp8 == "on"
    if args.engine_dir == "none":  # eager static denoiser: checks the loading path without a build
        options.update(allow_fallback=True, compile_vae=False)
    pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=None if args.engine_dir == "none" else args.engine_dir,
                                             device="cuda", torch_dtype=dtype, **options)
    pipe.set_progress_bar_config(disable=True)
    snapshot("pipeline made", rows)
    for i in range(args.images):
        gen = torch.Generator("cuda").manual_seed(i)
        embeds = pipe.encode_prompt([PROMPT_160])
        snapshot(f"image {i}: text", rows)
        latents = pipe(prompt_embeds=embeds, generator=gen, output_type="latent", height=args.side, width=args.side).images
        print(f"  latents finite: {bool(torch.isfinite(latents).all())}, std {latents.float().std().item():.3f}", flush=True)
        snapshot(f"image {i}: denoise", rows)
        pipe.decode_latents(latents, "pil")
        snapshot(f"image {i}: vae + image", rows)
        if i == 0:
            torch.cuda.reset_peak_memory_stats()  # from here: steady generation, loading and compiling done
            snapshot("steady state from here", rows)
    print("MEMORY", json.dumps(rows), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-dir", required=True, help="engine folder, or 'none' for the eager fallback")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp8"])
    ap.add_argument("--text-encoder-fp8", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--components-on", default="cuda", choices=["cuda", "cpu"],
                    help="where the weights are before the pipeline takes them (cpu: as from_pretrained loads them)")
    ap.add_argument("--build", action="store_true", help="build the 1024x1024 engine first, then measure in a fresh process")
    args = ap.parse_args()
    if not args.build:
        return measure(args)
    from zimage_trt import build_engines
    from zimage_trt.benchmark.common import full_size_transformer

    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    build_engines(full_size_transformer("cuda", dtype), ["1024x1024"], args.engine_dir, backend="torch-compiled",
                  precision=args.precision, caption_capacity=512, progress=False, vae=False)
    forwarded = [a for a in sys.argv[1:] if a != "--build"]
    return subprocess.run([sys.executable, __file__, *forwarded]).returncode


if __name__ == "__main__":
    sys.exit(main())
