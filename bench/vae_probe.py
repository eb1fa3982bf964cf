"""Speed III (issue 21, item 1): where the VAE stage's time goes at 1024², full-size Z-Image VAE
(16-channel Flux config) with random weights, one GPU.

1. Decoder variants, each timed alone with CUDA events (p50 of --iters): eager; compiled (as the
   pipeline compiles it, engines/torch_compiled.compile_vae_decoder); channels-last weights; fp16 and
   bf16; cudnn.benchmark on; Inductor options (coordinate-descent tuning; max-autotune with --slow).
   Each with its 8-bit image's PSNR against the eager decoder in the same dtype (diffusers' decoder).
2. The work around the decoder, piece by piece (CUDA events for GPU work, wall time for host work):
   latent scaling, finiteness check, denormalise, 8-bit conversion + NHWC, copy to the host (pageable
   vs pinned), PIL (RGB copy vs an RGBX buffer mapped without a copy).
3. The whole stage as the pipeline times it (wall time, synced): the code before Speed III (two host
   syncs, pageable copy) against `runtime.image_output.decode_latents` now, both with the compiled decoder.

    python bench/vae_probe.py [--variants ...] [--iters 20] [--json vae_probe.json]

Under bench/speed3.py it runs as a phased job: every variant is compiled first, then (when the parent
says go) timed, so its timings never overlap another job's compilation.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from zimage_trt.benchmark import phased
from zimage_trt.benchmark.common import cuda_time_ms, environment, full_size_vae
from zimage_trt.benchmark.quality import psnr
from zimage_trt.engines.torch_compiled import compile_vae_decoder
from zimage_trt.runtime import image_output
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.testing.tiny import make_tiny_components

# name: (dtype, compiled, channels_last, cudnn_benchmark, inductor options)
VARIANTS = {
    "eager-bf16": ("bf16", False, False, False, None),
    "eager-fp16": ("fp16", False, False, False, None),
    "compiled-bf16": ("bf16", True, False, False, None),
    "compiled-fp16": ("fp16", True, False, False, None),
    "compiled-bf16-cl": ("bf16", True, True, False, None),
    "compiled-fp16-cl": ("fp16", True, True, False, None),
    "compiled-bf16-cudnn-bench": ("bf16", True, False, True, None),
    "compiled-fp16-cl-cudnn-bench": ("fp16", True, True, True, None),
    "compiled-bf16-coord-descent": ("bf16", True, False, False, {"coordinate_descent_tuning": True}),
    "compiled-bf16-max-autotune": ("bf16", True, False, False, {"max_autotune": True}),  # minutes of compile
}
DEFAULT_VARIANTS = ("eager-bf16,eager-fp16,compiled-bf16,compiled-fp16,compiled-bf16-cl,compiled-fp16-cl,"
                    "compiled-bf16-cudnn-bench,compiled-bf16-coord-descent")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def events_ms(fn, iters: int, warmup: int = 3) -> dict:
    if not torch.cuda.is_available():  # (--smoke on a CPU: wall time)
        return wall_ms(fn, iters, warmup)
    return summarize(cuda_time_ms(fn, warmup=warmup, iters=iters))


def wall_ms(fn, iters: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def to_8bit(image: torch.Tensor) -> np.ndarray:
    return image_output.to_8bit_nhwc((image.float() * 0.5 + 0.5).clamp(0, 1)).cpu().numpy()


def make_vae(args, dtype):
    if args.smoke:  # the tiny random VAE on the CPU: a test of this script, not a measurement
        return make_tiny_components(seed=0)["vae"].to(dtype).eval()
    return full_size_vae("cuda", dtype)


def prepare(args):
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device = "cpu" if args.smoke else "cuda"
    channels = make_vae(args, torch.float32).config.latent_channels if args.smoke else 16
    latents = torch.randn(1, channels, args.side // 8, args.side // 8, device=device,
                          generator=torch.Generator(device).manual_seed(0))
    built, failed = {}, {}
    for name in args.variants.split(","):
        dtype_name, compiled, channels_last, cudnn_bench, options = VARIANTS[name]
        start = time.perf_counter()
        try:
            vae = make_vae(args, DTYPES[dtype_name])
            torch.backends.cudnn.benchmark = cudnn_bench
            if compiled:
                compile_vae_decoder(vae, channels_last=channels_last, options=options)
            elif channels_last:
                vae.decoder.to(memory_format=torch.channels_last)
            z = latents.to(vae.dtype)
            with torch.no_grad():
                out = vae.decoder(z)  # the first call compiles
            sync()
            built[name] = dict(vae=vae, z=z, first_s=time.perf_counter() - start, image=to_8bit(out))
            print(f"{name}: first call (build/compile) {built[name]['first_s']:.1f} s", flush=True)
        except Exception as error:  # report and go on: this is a probe
            failed[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name}: FAILED {failed[name]}", flush=True)
        finally:
            torch.backends.cudnn.benchmark = False
    return dict(args=args, latents=latents, built=built, failed=failed)


def decoder_part(state, iters) -> dict:
    rows = {}
    built = state["built"]
    for name, entry in built.items():
        dtype_name, _, _, cudnn_bench, _ = VARIANTS[name]
        torch.backends.cudnn.benchmark = cudnn_bench
        with torch.no_grad():
            stats = events_ms(lambda e=entry: e["vae"].decoder(e["z"]), iters)
        torch.backends.cudnn.benchmark = False
        ref = built.get(f"eager-{dtype_name}")
        quality = psnr(entry["image"][0], ref["image"][0]) if ref is not None else None
        rows[name] = dict(ms=stats, first_call_s=entry["first_s"], psnr_vs_eager_db=quality)
        print(f"decoder {name:<30} p50 {stats['p50']:7.2f} ms  mean {stats['mean']:7.2f}  cv {100 * stats['cv']:5.2f}%  "
              f"PSNR vs eager {dtype_name} {quality if quality is None else round(quality, 1)} dB", flush=True)
    for name, error in state["failed"].items():
        rows[name] = dict(error=error)
    return rows


def pieces_part(vae, latents, iters) -> dict:
    """Each piece of the stage around the decoder, alone."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    proc = VaeImageProcessor(vae_scale_factor=16)
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor,
                           return_dict=False)[0]
    unit = proc.postprocess(image, output_type="pt")
    pixels = image_output.to_8bit_nhwc(unit)
    nchw = unit.float().mul(255).round().to(torch.uint8)
    pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=pixels.is_cuda)
    host = pixels.cpu().numpy()
    rgbx = np.concatenate([host, np.full(host.shape[:-1] + (1,), 255, np.uint8)], axis=-1)
    gpu = {
        "latent scaling": lambda: latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor,
        "isfinite(image).all() (no sync)": lambda: torch.isfinite(image).all(),
        "denormalise (diffusers postprocess 'pt')": lambda: proc.postprocess(image, output_type="pt"),
        "before: float, *255, round, uint8 (4 kernels)": lambda: unit.float().mul(255).round().to(torch.uint8),
        "now: to_8bit_nhwc (uint8 NHWC)": lambda: image_output.to_8bit_nhwc(unit),
    }
    host_work = {
        "isfinite + host sync (bool)": lambda: bool(torch.isfinite(image).all()),
        "before: NCHW permuted + .cpu() pageable": lambda: nchw.permute(0, 2, 3, 1).cpu(),
        "contiguous NHWC .cpu() pageable": lambda: pixels.cpu(),
        "now: pinned copy + sync": lambda: (pinned.copy_(pixels, non_blocking=True), sync()),
        "PIL fromarray RGB (copies)": lambda: Image.fromarray(host[0]),
        "PIL frombuffer RGBX mapped (no copy)": lambda: Image.frombuffer("RGB", host.shape[2:0:-1], rgbx[0], "raw", "RGBX", 0, 1),
    }
    rows = {}
    for name, fn in gpu.items():
        rows[name] = events_ms(fn, iters)
        print(f"piece (GPU)  {name:<48} p50 {rows[name]['p50']:7.3f} ms", flush=True)
    for name, fn in host_work.items():
        rows[name] = wall_ms(fn, iters)
        print(f"piece (wall) {name:<48} p50 {rows[name]['p50']:7.3f} ms", flush=True)
    return rows


def stage_before(vae, proc, latents):
    """decode_latents as it was before Speed III (kept here to measure against)."""
    from PIL import Image

    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    if not torch.isfinite(image).all():
        raise RuntimeError("non-finite")
    pixels = proc.postprocess(image, output_type="pt").float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in pixels]


def stage_part(vae, latents, iters) -> dict:
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=16)
    staging = image_output.PinnedImages()
    with torch.no_grad():
        before = wall_ms(lambda: stage_before(vae, proc, latents), iters)
        now = wall_ms(lambda: image_output.decode_latents(vae, proc, latents, "pil", staging), iters)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(stage_before(vae, proc, latents), image_output.decode_latents(vae, proc, latents, "pil", staging)))
    print(f"stage before Speed III  mean {before['mean']:7.2f} ms  p50 {before['p50']:7.2f}", flush=True)
    print(f"stage now               mean {now['mean']:7.2f} ms  p50 {now['p50']:7.2f}  bitwise the same images: {same}",
          flush=True)
    return {"before_ms": before, "now_ms": now, "bitwise_same": same}


def measure(state) -> dict:
    args = state["args"]
    results = {"env": environment(), "side": args.side, "decoder": decoder_part(state, args.iters)}
    stage_vae = next((state["built"][n]["vae"] for n in ("compiled-bf16", "compiled-fp16", "eager-bf16") if n in state["built"]), None)
    if stage_vae is not None:
        results["pieces"] = pieces_part(stage_vae, state["latents"], args.iters)
        results["stage"] = stage_part(stage_vae, state["latents"], args.iters)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return {k: v for k, v in results.items() if k != "env"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels (square)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per variant and piece")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--smoke", action="store_true", help="the tiny VAE on the CPU, eager variants: a test of this script")
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if not torch.cuda.is_available() and not args.smoke:
        ap.error("the VAE probe times CUDA kernels: it needs a GPU (--smoke: the tiny VAE on the CPU)")
    return phased.run_worker(lambda: prepare(args), measure)


if __name__ == "__main__":
    sys.exit(main())
