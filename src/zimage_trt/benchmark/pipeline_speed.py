"""End to end, text to image: our pipeline against diffusers' ZImagePipeline and its accelerated
peers, one GPU.

Full-size Z-Image-Turbo architecture with random weights, 8 steps, guidance 0, a ~160-token prompt.
Measures: engine build, cold start (fresh process: engine files -> first image), steady per-image
latency (mean, std, p50, p95, CV over --images after warm-up), per-stage split, peak GPU memory,
other resolutions, latency next to a noisy neighbour process, and the peers (benchmark/peers.py:
diffusers eager; + compile_repeated_blocks and a compiled VAE decoder; cache-dit on that; torchao FP8
on that), each in its own process after ours, its prepare phase (quantise + compile + warm-up) timed
apart and bounded by --peer-timeout, with its image's PSNR against diffusers' eager image at the
same seed. The GPU runs one thing at a time: our pipeline waits while a peer runs.

    zimage-trt bench --engine-dir engines/bench --json results.json
    zimage-trt bench --tiny      # CPU smoke test of this benchmark with the tiny model
(`python -m zimage_trt.benchmark.pipeline_speed` is the same.) It is part of the package, so it runs
from an installed wheel as from a source checkout.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..compiler.build import build_engines
from ..files import atomic_write_text
from ..model.attention import BACKENDS as ATTENTION_BACKENDS
from ..model.precision import precision_dtype
from ..model.shapes import Resolution
from ..pipeline import ZImageTRTPipeline
from ..runtime.telemetry import summarize
from . import phased, quality
from .common import PROMPT_160, bench_components, environment, timed_images
from .peers import DEFAULT_CACHE_DIT_MASK, PEERS, peer_job, save_png as save_png_file

components = bench_components  # (the name the cold-start child imports)

SGLANG_H100_BF16_MS = 906  # SGLang-Diffusion's published single-H100 bf16 figure (perf_baselines/h100.json)
QUALITY_SEED = 4321

NEIGHBOUR = """
import sys, time, torch
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)
end = time.time() + float(sys.argv[1]); n = 0
while time.time() < end:
    for _ in range(8): a @ b
    torch.cuda.synchronize(); n += 8
print('NEIGHBOUR_MATMULS', n)
"""


def save_png(folder, name: str, image) -> None:
    """An image (PIL, or float array in [0, 1] HxWx3) as folder/name.png, written whole or not at all."""
    if folder is not None:
        save_png_file(Path(folder) / f"{name}.png", image)


def row(name, stats, base=None):
    ratio = f"  {base / stats['mean']:5.2f}x vs eager" if base else ""
    return (f"{name:<46} mean {stats['mean']:8.1f}  std {stats['std']:6.1f}  p50 {stats['p50']:8.1f}  "
            f"p95 {stats['p95']:8.1f}  cv {100 * stats['cv']:5.2f}%{ratio}")


DEFAULT_PEER_TIMEOUT_S = 600.0


def peer_timeouts(values: list[str] | None) -> tuple[float, dict[str, float]]:
    """--peer-timeout values: SECONDS (every peer) and NAME=SECONDS (one peer) -> (default, per peer)."""
    default, per_peer = DEFAULT_PEER_TIMEOUT_S, {}
    for value in values or []:
        name, _, seconds = value.rpartition("=")
        try:
            number = float(seconds)
        except ValueError:
            number = -1.0
        if number <= 0 or (name and name not in PEERS):
            raise ValueError(f"--peer-timeout {value!r}: give SECONDS or NAME=SECONDS (seconds > 0, NAME one of "
                             f"{', '.join(PEERS)})")
        if name:
            per_peer[name] = number
        else:
            default = number
    return default, per_peer


def chosen_peers(value: str, precision: str) -> list[str]:
    if value == "auto":
        return ["diffusers-eager", "torchao-fp8"] if precision == "fp8" else ["diffusers-eager", "diffusers-compiled", "cache-dit"]
    names = [n for n in value.split(",") if n]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"--peers: unknown {unknown}; choose from {', '.join(PEERS)} (or auto)")
    return names


def run_peers(args, ours: dict, our_image: Path, image_dir: Path, results: dict) -> None:
    """Each peer in its own process, one after another: its prepare (quantise, compile, warm-up) timed
    and bounded by --peer-timeout, then its images; beside each, its image's PSNR against diffusers'
    eager one at the quality seed (and ours against the same)."""
    default, per_peer = peer_timeouts(args.peer_timeout)
    side = 256 if args.tiny else 1024
    names = chosen_peers(args.peers, args.precision)
    eager_first = sorted(names, key=lambda n: n != "diffusers-eager")
    outcomes = {}
    for name in eager_first:
        job = peer_job(name, tiny=args.tiny, side=side, images=args.peer_images, warmup=2,
                       quality_seed=QUALITY_SEED, image_dir=image_dir, prepare_timeout_s=per_peer.get(name, default),
                       compile_cache=args.peer_cache, extra=["--cache-dit-mask", args.cache_dit_mask])
        outcomes.update(phased.run_wave([job], Path(args.engine_dir) / "peer-logs", report=lambda line: None))
    eager_image = outcomes.get("diffusers-eager", {}).get("quality_image")
    if eager_image:
        results["psnr_vs_diffusers_db"] = quality.psnr(quality.load_rgb(our_image), quality.load_rgb(eager_image))
    for name in eager_first:
        outcome = outcomes[name]
        if outcome["status"] == "ok" and eager_image:
            outcome["psnr_vs_eager_db"] = quality.psnr(quality.load_rgb(outcome["quality_image"]), quality.load_rgb(eager_image))
        results["peers"][name] = outcome
        if outcome["status"] != "ok":
            print(f"{name:<46} {phased.describe(outcome)}", flush=True)
            continue
        stats = outcome["per_image_ms"]
        print(row(name, stats) + f"  prepare {outcome['prepare_s']:.0f} s  PSNR vs eager "
              f"{outcome.get('psnr_vs_eager_db', float('nan')):.1f} dB   ours {stats['mean'] / ours['mean']:.2f}x faster",
              flush=True)
    if "diffusers-eager" in results["peers"] and results["peers"]["diffusers-eager"]["status"] == "ok":
        results["diffusers_eager"] = results["peers"]["diffusers-eager"]["per_image_ms"]
    if "psnr_vs_diffusers_db" in results:
        print(f"image PSNR ours vs diffusers eager (seed {QUALITY_SEED}): {results['psnr_vs_diffusers_db']:.1f} dB", flush=True)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--engine-dir", default="engines/bench", help="where the benchmark builds its engines")
    ap.add_argument("--images", type=int, default=20, help="images timed for our pipeline, after warm-up")
    ap.add_argument("--peer-images", type=int, default=10, help="images timed for each peer")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32", "fp8"),
                    help="engine precision (fp8: the FP8 peer is diffusers + torchao, see --compare)")
    ap.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                    help="attention kernel compiled into our engine (auto: FlashAttention-3 where it runs)")
    ap.add_argument("--fp8-keep", default="auto", help="FP8 quality policy of our build: auto, none or block names")
    ap.add_argument("--skip-cold-start", action="store_true", help="do not measure the fresh-process cold start")
    ap.add_argument("--skip-neighbour", action="store_true", help="do not measure next to a noisy neighbour")
    ap.add_argument("--extra-resolutions", default="512x512,1344x768",
                    help="comma-separated WIDTHxHEIGHT also built and timed (empty: none)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--save-images", default=None, metavar="DIR",
                    help="also save the images behind each PSNR figure here as PNG (ours and diffusers' at the "
                         "same seed; for fp8 our FP8 and bf16 images at the quality seed)")
    ap.add_argument("--batch", type=int, default=4, help="also measure images/s at this batch (1: skip)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU: a smoke test of the script")
    ap.add_argument("--skip-peers", action="store_true", help="time ours only, not diffusers' pipelines")
    ap.add_argument("--compare", default="diffusers", choices=("diffusers", "none"),
                    help="diffusers: run the --peers; 'none' is --skip-peers")
    ap.add_argument("--peers", default="auto",
                    help="comma-separated, of: " + ", ".join(PEERS) + " (each in its own process, one after another; "
                         "auto: diffusers-eager,diffusers-compiled,cache-dit, or for fp8 diffusers-eager,torchao-fp8); "
                         "one whose package is missing is reported and skipped")
    ap.add_argument("--peer-timeout", action="append", default=None, metavar="[NAME=]SECONDS",
                    help=f"bound on a peer's prepare phase (quantise + compile + 2 warm-up images), after which it "
                         f"is reported as 'did not finish' and the bench goes on; SECONDS for every peer, "
                         f"NAME=SECONDS for one, repeatable (default: {DEFAULT_PEER_TIMEOUT_S:.0f} s each)")
    ap.add_argument("--peer-cache", default=None, metavar="DIR",
                    help="torch compile caches of the peers kept in DIR (a second run skips compilation where torch "
                         "allows; the folder holds code torch loads: use only one your own runs wrote) "
                         "(default: none, torch's own locations)")
    ap.add_argument("--cache-dit-mask", default=DEFAULT_CACHE_DIT_MASK,
                    help="cache-dit peer: its static steps_computation_mask, a digit a step (1 computed, 0 from its "
                         "DBCache; the default computes 6 of 8)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zimage-trt bench", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args) -> int:
    args.skip_peers = args.skip_peers or args.compare == "none"
    device = "cpu" if args.tiny else "cuda"
    dtype = precision_dtype(args.precision)
    side = 256 if args.tiny else 1024
    main_res = f"{side}x{side}"
    extra = [] if args.tiny else [r for r in args.extra_resolutions.split(",") if r]
    results = {"env": environment(), "args": {k: v for k, v in vars(args).items() if not callable(v)}}
    print(results["env"], flush=True)
    size = {"height": side, "width": side}

    parts = components(args.tiny, device, dtype)
    fp8 = args.precision == "fp8"
    reference = None
    if fp8:
        # The 16-bit reference for FP8's deviation: our eager bf16 pipeline on the same weights and seed,
        # before the FP8 build converts the shared transformer in place.
        ref_pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=None, device=device, torch_dtype=dtype,
                                                     compile_vae=False)
        ref_pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            ref_lat = ref_pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(QUALITY_SEED), output_type="latent",
                               **size).images
            reference = (ref_lat, ref_pipe.decode_latents(ref_lat, "np")[0])
        save_png(args.save_images, f"quality-seed{QUALITY_SEED}-ours-bf16", reference[1])
        del ref_pipe
    start = time.perf_counter()
    build_engines(parts["transformer"], [main_res, *extra], args.engine_dir, backend="torch-compiled",
                  precision=args.precision, caption_capacity=512 if not args.tiny else 64, batch=max(1, args.batch),
                  progress=False, vae=parts["vae"] if device == "cuda" else False,
                  attention_backend=args.attention_backend, fp8_keep=args.fp8_keep)
    results["build_s"] = time.perf_counter() - start
    print(f"engine build ({main_res} + {extra}): {results['build_s']:.1f}s", flush=True)

    # Cold start: a fresh process with empty compiler caches (only the engine files help it), weights
    # made in memory (not counted), then engine files -> first image. The same process then measures
    # peak GPU memory of steady generation, with no build in it: allocated by tensors, and reserved
    # (what the process holds from the GPU, CUDA graph pools included: what must fit the card).
    manifest = json.loads(next(Path(args.engine_dir).glob("*.manifest.json")).read_text())
    results["engine"] = {k: manifest.get(k) for k in ("attention_backend", "fused_kernels", "fp8_keep")}
    print(f"engine: {results['engine']}", flush=True)
    caches = tempfile.mkdtemp(prefix="zimage-cold-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}
    cold = subprocess.CompletedProcess([], 0, "", "skipped") if args.skip_cold_start else subprocess.run([sys.executable, "-c", f"""
import json, time, torch, sys
sys.argv = ['x'] + {['--tiny'] if args.tiny else []!r}
from zimage_trt.benchmark.pipeline_speed import components, PROMPT_160
from zimage_trt.model.precision import precision_dtype
from zimage_trt import ZImageTRTPipeline
dtype = precision_dtype({args.precision!r})
parts = components({args.tiny}, {device!r}, dtype)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
pipe = ZImageTRTPipeline.from_components(**parts, engine_dir={args.engine_dir!r}, device={device!r}, torch_dtype=dtype, precision={args.precision!r})
pipe.set_progress_bar_config(disable=True)
t1 = time.perf_counter()
first = pipe(PROMPT_160, height={side}, width={side}, generator=torch.Generator({device!r}).manual_seed(0))
t2 = time.perf_counter()
t = first.timings
print('COLD_START_S', t2 - t0)
print('COLD_SPLIT', json.dumps(dict(pipeline_s=t1 - t0, text_s=t.text_encode_ms / 1e3, denoise_s=t.denoise_ms / 1e3, vae_s=t.vae_decode_ms / 1e3)))
for i in range(5):
    pipe(PROMPT_160, height={side}, width={side}, generator=torch.Generator({device!r}).manual_seed(i))
if torch.cuda.is_available():
    print('PEAK_GIB', json.dumps(dict(allocated=torch.cuda.max_memory_allocated() / 2**30, reserved=torch.cuda.max_memory_reserved() / 2**30)))
"""], capture_output=True, text=True, env=env)
    shutil.rmtree(caches, ignore_errors=True)
    if "COLD_START_S" in cold.stdout:
        results["cold_start_s"] = float(cold.stdout.split("COLD_START_S")[1].split()[0])
        results["cold_start_split_s"] = json.loads(cold.stdout.split("COLD_SPLIT")[1].splitlines()[0])
        print(f"cold start, engine files -> first image (fresh process, empty compiler caches): "
              f"{results['cold_start_s']:.1f}s  {results['cold_start_split_s']}", flush=True)
        if "PEAK_GIB" in cold.stdout:
            results["fresh_process_peak_gib"] = json.loads(cold.stdout.split("PEAK_GIB")[1].splitlines()[0])
            print(f"peak GPU memory, fresh process, 6 images: {results['fresh_process_peak_gib']}", flush=True)
    elif not args.skip_cold_start:
        print("cold start run failed:", cold.stderr[-2000:], flush=True)

    pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=args.engine_dir, device=device, torch_dtype=dtype,
                                             precision=args.precision)
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed_images(pipe, 2, **size)  # warm-up: compile from the persisted artefacts, capture graphs
    pipe.telemetry.clear()
    times, _ = timed_images(pipe, args.images, **size)
    ours = summarize(times)
    stats = pipe.stats()
    results["ours"] = {"per_image_ms": ours, "stages": {k: stats[k] for k in ("text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms")}}
    if device == "cuda":
        results["ours"]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results["ours"]["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print(row(f"ours {args.precision} {main_res}", ours), flush=True)
    print("  stages (mean ms): text {:.1f}  denoise {:.1f} (step {:.2f})  vae {:.1f}  peak GPU {:.1f} GiB".format(
        stats["text_encode_ms"]["mean"], stats["denoise_ms"]["mean"], stats["step_ms"]["mean"],
        stats["vae_decode_ms"]["mean"], results["ours"].get("peak_gpu_gib", 0.0)), flush=True)

    if reference is not None:
        with torch.no_grad():
            lat = pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(QUALITY_SEED), output_type="latent",
                       **size).images
            image = pipe.decode_latents(lat, "np")[0]
        save_png(args.save_images, f"quality-seed{QUALITY_SEED}-ours-{args.precision}", image)
        results["fp8_vs_bf16"] = {
            "rel_l2_latents": float((lat.float() - reference[0].float()).norm() / reference[0].float().norm()),
            "psnr_db": quality.psnr(image, reference[1]), "fp8_keep": results["engine"]["fp8_keep"]}
        print(f"FP8 vs bf16 (same weights, seed): latents rel L2 {results['fp8_vs_bf16']['rel_l2_latents']:.4f}, "
              f"image PSNR {results['fp8_vs_bf16']['psnr_db']:.1f} dB, blocks kept bf16 {results['engine']['fp8_keep']}",
              flush=True)

    if args.batch > 1:
        # Throughput: one call making `batch` images (torch-compiled engines take any batch).
        timed_images(pipe, 1, num_images_per_prompt=args.batch, **size)
        calls = summarize(timed_images(pipe, 5, num_images_per_prompt=args.batch, **size)[0])
        results[f"ours_batch{args.batch}"] = {"per_call_ms": calls, "images_per_s": args.batch * 1000 / calls["mean"]}
        print(row(f"ours {args.precision} batch {args.batch} (ms per call)", calls) +
              f"  -> {args.batch * 1000 / calls['mean']:.2f} images/s", flush=True)

    for res in extra:
        sides = Resolution.parse(res)
        timed_images(pipe, 1, height=sides.height, width=sides.width)
        r = summarize(timed_images(pipe, 5, height=sides.height, width=sides.width)[0])
        results[f"ours_{res}"] = r
        print(row(f"ours {args.precision} {res}", r), flush=True)

    if device == "cuda" and not args.skip_neighbour:
        # Latency next to a noisy neighbour: another process running large matmuls on the same GPU.
        for priority in (0, -1):
            pipe_p = ZImageTRTPipeline.from_components(**parts, engine_dir=args.engine_dir, device=device, torch_dtype=dtype,
                                                       stream_priority=priority, precision=args.precision)
            pipe_p.set_progress_bar_config(disable=True)
            timed_images(pipe_p, 1, **size)
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, "60"], stdout=subprocess.PIPE, text=True)
            time.sleep(4)
            loaded = summarize(timed_images(pipe_p, 10, **size)[0])
            neighbour.terminate()
            neighbour.wait()
            results[f"noisy_neighbour_priority_{priority}"] = loaded
            print(row(f"ours next to a matmul neighbour, priority {priority}", loaded), flush=True)
            del pipe_p

    if not args.skip_peers:
        # Ours at the quality seed, then each peer in its own process (it makes the same weights).
        image_dir = Path(args.save_images) if args.save_images else Path(tempfile.mkdtemp(prefix="zimage-bench-images-"))
        our_image = image_dir / f"seed{QUALITY_SEED}-ours-{args.precision}.png"
        save_png_file(our_image, pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(QUALITY_SEED),
                                      **size).images[0])
        results["peers"] = {}
        try:
            run_peers(args, ours, our_image, image_dir, results)
        finally:
            if not args.save_images:
                shutil.rmtree(image_dir, ignore_errors=True)
        if "diffusers_eager" in results:
            print(row(f"ours {args.precision}", ours, results["diffusers_eager"]["mean"]), flush=True)
        print(f"ours vs SGLang-Diffusion's published H100 bf16 figure ({SGLANG_H100_BF16_MS} ms): "
              f"{SGLANG_H100_BF16_MS / ours['mean']:.2f}x (not measured here)", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
