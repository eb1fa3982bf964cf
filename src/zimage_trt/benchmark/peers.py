"""The contenders of `zimage-trt bench` and bench/speed3.py, each a phased job in its own process
(benchmark/phased.py): prepare (components, quantisation, compilation, warm-up images: timed, and
printed) then measure (timed images and one image at the quality seed, saved as an 8-bit PNG for the
PSNR against diffusers' eager image).

    diffusers-eager      diffusers' ZImagePipeline, bf16 (fp32 for --tiny), eager
    diffusers-compiled   + transformer.compile_repeated_blocks(fullgraph=True) + the VAE decoder compiled
    cache-dit            cache-dit's DBCache (its defaults) with a static steps_computation_mask (6 of 8
                         steps computed), on the compiled pipeline
    torchao-fp8          the transformer quantised by torchao (FP8 e4m3 weights and dynamic activations,
                         one scale per row) + the same compilation
    ours                 ZImageTRTPipeline from engines this job builds (precision and switches by flags)

Optional packages (cache_dit, torchao) are imported in the child; one that does not import is reported
"missing", not fatal. Every job makes the same random full-size weights (seeded per component), so
images at one seed are comparable across processes. `--compile-cache DIR` points torch's compile caches
(Inductor, Triton, FX graphs, AOTAutograd) at DIR, so a second run skips compilation where torch can;
the folder holds code torch loads: use one your own runs wrote.

    python -m zimage_trt.benchmark.peers --peer diffusers-eager --tiny --images 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ..compiler.build import build_engines
from ..files import atomic_path
from ..model.fp8_gemm import FP8_EPILOGUES_ENV
from ..model.precision import precision_dtype
from ..pipeline import ZImageTRTPipeline
from ..runtime.telemetry import summarize
from . import phased, quality
from .common import PROMPT_160, bench_components, environment, timed_images

PEERS = ("diffusers-eager", "diffusers-compiled", "cache-dit", "torchao-fp8")
REQUIRES = {"diffusers-compiled": ("diffusers",), "diffusers-eager": ("diffusers",),
            "cache-dit": ("diffusers", "cache_dit"), "torchao-fp8": ("diffusers", "torchao"), "ours": ()}
# 1 = computed, 0 = cache-dit's cache: four warm-up steps, then every other, the last one computed.
DEFAULT_CACHE_DIT_MASK = "11110101"
SEED_BASE = 100  # timed image i uses seed SEED_BASE + i
STEPS = 8


def compile_cache_env(folder: str | os.PathLike | None) -> dict:
    """Environment that points torch's compile caches at `folder` (none: torch's defaults)."""
    if not folder:
        return {}
    folder = Path(folder).resolve()
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def peer_job(name: str, *, tiny: bool, side: int, images: int, warmup: int, quality_seed: int, image_dir,
             prepare_timeout_s: float, compile_cache=None, extra=(), label: str | None = None) -> phased.Job:
    """The phased job that runs contender `name` (`extra`: more flags for it, e.g. ours' precision)."""
    argv = [sys.executable, "-m", "zimage_trt.benchmark.peers", "--peer", name, "--side", str(side),
            "--images", str(images), "--warmup", str(warmup), "--quality-seed", str(quality_seed),
            "--image-dir", str(image_dir), "--label", label or name, *(["--tiny"] if tiny else []), *extra]
    return phased.Job(label or name, argv, prepare_timeout_s=prepare_timeout_s,
                      measure_timeout_s=max(120.0, 30.0 * (images + 2)), env=compile_cache_env(compile_cache))


def save_png(path: Path, image) -> None:
    """An 8-bit RGB image (PIL, or a float array in [0, 1] rounded as diffusers' numpy_to_pil), whole or not at all."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(quality.to_8bit(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def image_call(side: int) -> dict:
    """The arguments of every contender's call besides the prompt and the generator."""
    return dict(height=side, width=side, num_inference_steps=STEPS, guidance_scale=0.0)


def _diffusers_pipeline(parts):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                          tokenizer=parts["tokenizer"], transformer=parts["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compile(pipe, on_gpu: bool) -> None:
    if on_gpu:  # (the CPU smoke test stays eager: Inductor's CPU compile would take minutes there)
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        pipe.vae.decoder.compile()


def prepare_diffusers(args, device) -> tuple:
    """A diffusers pipeline set up as `args.peer` says; returns (pipe, details)."""
    dtype = torch.float32 if args.tiny else torch.bfloat16
    pipe = _diffusers_pipeline(bench_components(args.tiny, device, dtype))
    details = {}
    on_gpu = device == "cuda"
    if args.peer == "cache-dit":
        import cache_dit

        mask = [int(c) for c in args.cache_dit_mask]
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            steps_computation_mask=mask, steps_computation_policy=args.cache_dit_policy))
        details["cache_dit_mask"], details["cache_dit_policy"] = args.cache_dit_mask, args.cache_dit_policy
        _compile(pipe, on_gpu)
    elif args.peer == "torchao-fp8":
        import torch._inductor.config as inductor_config
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        start = time.perf_counter()
        # set_inductor_config=False: by default quantize_ turns on Inductor's coordinate-descent tuning for the
        # whole process (the VAE decoder's compile too): every Triton kernel is tuned at its first run, the likely
        # reason this peer's first image outlasted its budget. Off, it compiles as the diffusers-compiled peer does.
        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                              set_inductor_config=False))
        details["quantise_s"] = time.perf_counter() - start
        details["coordinate_descent_tuning"] = bool(inductor_config.coordinate_descent_tuning)
        _compile(pipe, on_gpu)
    elif args.peer == "diffusers-compiled":
        _compile(pipe, on_gpu)
    return pipe, details


def prepare_ours(args, device) -> tuple:
    precision = args.precision
    dtype = precision_dtype(precision)
    parts = bench_components(args.tiny, device, dtype)
    engines = None if args.no_build else Path(args.engines or f"engines-bench-{args.label}")
    if args.fp8_epilogues is not None:  # (read by set_fused_kernels in the build and when the engine opens)
        os.environ[FP8_EPILOGUES_ENV] = "1" if args.fp8_epilogues == "on" else "0"
    start = time.perf_counter()
    if engines is not None:
        build_engines(parts["transformer"], [f"{args.side}x{args.side}"], engines, backend="torch-compiled",
                      precision=precision, caption_capacity=64 if args.tiny else 512, batch=1, progress=False,
                      vae=parts["vae"] if device == "cuda" else False, attention_backend=args.attention_backend,
                      fp8_keep=args.fp8_keep)
    details = {"build_s": time.perf_counter() - start}
    pipe = ZImageTRTPipeline.from_components(
        **parts, engine_dir=None if engines is None else str(engines), device=device, torch_dtype=dtype, precision=precision,
        text_encoder_fp8_kernel=None if args.text_fp8_kernel is None else args.text_fp8_kernel == "on")
    pipe.set_progress_bar_config(disable=True)
    details["text_encoder_fp8"] = bool(pipe.text_encoder_fp8)
    details["text_encoder_fp8_kernel"] = bool(pipe.text_encoder_fp8_kernel)
    return pipe, details


def prepare(args) -> dict:
    phased.require(*REQUIRES[args.peer])
    device = "cpu" if args.tiny else "cuda"
    start = time.perf_counter()
    pipe, details = (prepare_ours if args.peer == "ours" else prepare_diffusers)(args, device)
    details["setup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    timed_images(pipe, args.warmup, seed=SEED_BASE, device=device, **image_call(args.side))  # compilation happens here for torch.compile'd peers
    details["warmup_s"] = time.perf_counter() - start
    print(f"{args.label}: setup {details['setup_s']:.1f} s, {args.warmup} warm-up images {details['warmup_s']:.1f} s "
          f"{details}", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return dict(args=args, pipe=pipe, device=device, details=details)


def measure(state) -> dict:
    args, pipe, device = state["args"], state["pipe"], state["device"]
    if args.peer == "ours":
        pipe.telemetry.clear()
    stats = summarize(timed_images(pipe, args.images, seed=SEED_BASE, device=device, **image_call(args.side))[0])
    result = {"peer": args.peer, "per_image_ms": stats, **state["details"]}
    if args.peer == "ours":
        numbers = pipe.stats()
        result["stages"] = {k: numbers[k] for k in ("text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms")}
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    image = pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(args.quality_seed),
                 **image_call(args.side)).images[0]
    path = Path(args.image_dir) / f"seed{args.quality_seed}-{args.label}.png"
    save_png(path, image)
    result["quality_image"] = str(path)
    if args.peer == "cache-dit":  # which steps its cache served in that last call
        import cache_dit

        try:
            result["cache_dit_cached_steps"] = list(cache_dit.summary(pipe, logging=False)[-1].cached_steps)
        except Exception as error:  # its stats are a report, not the measurement
            result["cache_dit_cached_steps"] = f"unavailable: {type(error).__name__}: {error}"
    print(f"{args.label}: mean {stats['mean']:.1f} ms  p50 {stats['p50']:.1f}  cv {100 * stats['cv']:.2f}% "
          f"over {stats['count']} images", flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_trt.benchmark.peers", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--peer", required=True, choices=(*PEERS, "ours"), help="required: which contender")
    ap.add_argument("--label", default=None, help="name in logs and image files (default: the peer's)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU (a test of the plumbing)")
    ap.add_argument("--side", type=int, default=1024, help="square image side, pixels")
    ap.add_argument("--images", type=int, default=10, help="timed images")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images first (compilation happens there)")
    ap.add_argument("--quality-seed", type=int, default=4321, help="seed of the image saved for the PSNR")
    ap.add_argument("--image-dir", default="bench-images", help="where the quality image is written")
    ap.add_argument("--cache-dit-mask", default=DEFAULT_CACHE_DIT_MASK,
                    help="cache-dit: steps_computation_mask, one digit a step (1 computed, 0 from its cache)")
    ap.add_argument("--cache-dit-policy", default="static", choices=("dynamic", "static"),
                    help="cache-dit: steps_computation_policy for the mask's 0 steps (static: always from the cache, "
                         "the mask's 6 of 8 steps computed whatever the weights; dynamic, cache-dit's own default: "
                         "DBCache decides by its residual threshold, which random weights never pass: seen on the "
                         "H200, nothing cached)")
    ap.add_argument("--precision", default="fp16", help="ours: engine precision")
    ap.add_argument("--attention-backend", default="auto", help="ours: attention kernel")
    ap.add_argument("--fp8-keep", default="auto", help="ours: FP8 quality policy")
    ap.add_argument("--fp8-epilogues", choices=("on", "off"), default=None,
                    help="ours: the FP8 epilogue GEMM (default: $ZIMAGE_TRT_FP8_EPILOGUES, off)")
    ap.add_argument("--text-fp8-kernel", choices=("on", "off"), default=None,
                    help="ours: the FP8 text encoder's one-pass quantisation (default: $ZIMAGE_TRT_TEXT_FP8_KERNEL, on unless 0)")
    ap.add_argument("--engines", default=None, help="ours: engine folder to build into (default: engines-bench-LABEL)")
    ap.add_argument("--no-build", action="store_true", help="ours: no engines, the eager static denoiser (tests)")
    args = ap.parse_args(argv)
    args.label = args.label or args.peer
    if len(args.cache_dit_mask) != STEPS or set(args.cache_dit_mask) - {"0", "1"}:
        ap.error(f"--cache-dit-mask is {STEPS} digits of 0 and 1, one a step; got {args.cache_dit_mask!r}")
    print(environment(), flush=True)
    return phased.run_worker(lambda: prepare(args), measure)


if __name__ == "__main__":
    sys.exit(main())
