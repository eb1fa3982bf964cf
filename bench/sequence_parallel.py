"""One image on several GPUs (Ulysses sequence parallelism) against one GPU, in the same run.

Full-size Z-Image-Turbo architecture with random weights (the speed of the maths does not depend on
the values), torch-compiled engines, 8 steps, guidance 0, the ~160-token prompt. For each precision
and resolution:

1. rank 0 builds the engine (torch-compiled, every resolution in one engine) while the other ranks wait;
2. rank 0 alone: the one-GPU pipeline (as `zimage-trt bench` runs it), end to end and per step;
3. every rank: the same engine, sequence-parallel over all ranks (`sequence_parallel=N`), without CUDA
   graphs, and with them if asked (`--cuda-graph both`: NCCL collectives captured in the step graph);
4. the PSNR of the sequence-parallel image against the one-GPU image for the same seed (the last timed
   image of each).

Compile caches are kept between phases (same processes, same inductor cache folder). Prints a table;
writes JSON to --json (default: $OUT/sequence_parallel.json when $OUT is set). Any world size runs: where
it does not divide the 30 heads (4, 8) they are padded with zero heads (recorded as `padded_heads`).

    torchrun --nproc-per-node 2 bench/sequence_parallel.py --out /tmp/sp-engines
    torchrun --nproc-per-node 2 bench/sequence_parallel.py --tiny --device cpu    # CPU smoke test (gloo)

Several degrees, one torchrun each (each with its own one-GPU rows, rank 0 of that run; the engines are
built by the first and reused by the others), then one table of them all:

    python bench/sequence_parallel.py --degrees 2,4,8 --out /tmp/sp-engines --json $OUT/sp_degrees.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from zimage_trt import ZImageTRTPipeline, build_engines
from zimage_trt.benchmark import quality
from zimage_trt.benchmark.common import PROMPT_160, environment
from zimage_trt.benchmark.pipeline_speed import components
from zimage_trt.files import atomic_write_text
from zimage_trt.model.precision import precision_dtype
from zimage_trt.model.shapes import Resolution
from zimage_trt.parallel import padded_heads
from zimage_trt.runtime.telemetry import summarize


def log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def timed_images(pipe, n: int, size: dict, seed: int = 100):
    """Per-image wall ms (synchronised), per-step ms (the loop's CUDA events; CPU: per-step wall), last output."""
    totals, steps, denoise, out = [], [], [], None
    for i in range(n):
        start = time.perf_counter()
        out = pipe(PROMPT_160, generator=torch.Generator(pipe.device).manual_seed(seed + i), output_type="np", **size)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        totals.append((time.perf_counter() - start) * 1e3)
        steps += list(out.timings.step_ms)
        denoise.append(out.timings.denoise_ms)
    return {"per_image_ms": summarize(totals), "step_ms": summarize(steps) if steps else None,
            "denoise_ms": summarize(denoise)}, out


def make_pipe(parts, args, dtype, precision, **options):
    pipe = ZImageTRTPipeline.from_components(
        **parts, engine_dir=args.out if args.engine == "compiled" else None, device=args.device_obj, torch_dtype=dtype,
        precision=precision, pad_prompts_to_max_length=not args.tiny, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def serve_or_measure(pipe, fn):
    """Rank 0 runs fn(pipe); the others serve its calls until it closes the pipeline."""
    try:
        if pipe.is_main_process:
            return fn(pipe)
        pipe.serve()
        return None
    finally:
        pipe.close()


def prepare(args, precision: str, results: dict) -> dict:
    """This precision's components on every rank; rank 0 builds the engine while the others wait."""
    dtype = precision_dtype(precision)
    parts_dtype = torch.bfloat16 if precision == "fp8" else dtype
    parts = components(args.tiny, args.device_obj, parts_dtype)
    if args.tiny and parts_dtype != torch.float32:
        for key in ("transformer", "vae", "text_encoder"):
            torch.nn.Module.to(parts[key], parts_dtype)
    if args.engine == "compiled":
        if dist.get_rank() == 0 and args.reuse_engines and built_already(args, precision):
            log(f"[{precision}] engine for {args.resolutions} already in {args.out}: reused")
        elif dist.get_rank() == 0:
            start = time.perf_counter()
            build_engines(parts["transformer"], args.resolutions, args.out, backend="torch-compiled",
                          precision=precision, caption_capacity=64 if args.tiny else 512, device=args.device_obj,
                          progress=False, vae=False if args.tiny else parts["vae"])
            results[f"{precision}_build_s"] = time.perf_counter() - start
            log(f"[{precision}] engine build {args.resolutions}: {results[f'{precision}_build_s']:.1f}s")
        dist.barrier()
    return parts


def built_already(args, precision: str) -> bool:
    """A torch-compiled denoiser of this precision holding every resolution is in --out (same seeded weights)."""
    from zimage_trt.engines.manifest import Manifest, find_manifests

    for path in find_manifests(args.out):
        manifest = Manifest.read(path)
        if (manifest.component == "denoiser" and manifest.backend == "torch-compiled" and manifest.precision == precision
                and set(args.resolutions) <= {shape.resolution for shape in manifest.shapes}):
            return True
    return False


def images_for(args, res: str) -> int:
    h, w = Resolution.parse(res).height, Resolution.parse(res).width
    return args.images if h * w <= 1024 * 1024 or args.tiny else args.large_images


def measure_one_gpu(args, parts, precision: str, results: dict, references: dict) -> None:
    """Rank 0 alone (the others wait at the barrier after it)."""
    if dist.get_rank() == 0:
        pipe = make_pipe(parts, args, precision_dtype(precision), precision)
        for res in args.resolutions:
            h, w = Resolution.parse(res).height, Resolution.parse(res).width
            size = {"height": h, "width": w}
            start = time.perf_counter()
            timed_images(pipe, args.warmup, size)
            warm_s = time.perf_counter() - start
            figures, last = timed_images(pipe, images_for(args, res), size)
            references[(precision, res)] = last.images[0]  # the same seed as the SP run's last image
            results[f"{precision}_{res}_one_gpu"] = {**figures, "warmup_s": warm_s}
            log(f"[{precision} {res}] one GPU: {figures['per_image_ms']['mean']:.1f} ms/image (warm-up {warm_s:.1f}s)")
            save(args, results)
        pipe.close()
        del pipe
    dist.barrier()


def measure_parallel(args, parts, precision: str, graphs: bool, results: dict, references: dict) -> None:
    world = dist.get_world_size()
    label = f"sp{world}" + ("_graphs" if graphs else "")
    pipe = make_pipe(parts, args, precision_dtype(precision), precision, sequence_parallel=world,
                     sequence_parallel_cuda_graph=graphs, sequence_parallel_timeout_s=args.timeout)

    def measure(pipe):
        for res in args.resolutions:
            h, w = Resolution.parse(res).height, Resolution.parse(res).width
            size = {"height": h, "width": w}
            start = time.perf_counter()
            timed_images(pipe, args.warmup, size)
            warm_s = time.perf_counter() - start
            figures, last = timed_images(pipe, images_for(args, res), size)
            image = last.images[0]
            base = results[f"{precision}_{res}_one_gpu"]
            entry = {**figures, "warmup_s": warm_s, "psnr_vs_one_gpu_db": quality.psnr(image, references[(precision, res)]),
                     "e2e_ratio_vs_one_gpu": figures["per_image_ms"]["mean"] / base["per_image_ms"]["mean"]}
            if figures["step_ms"] and base["step_ms"]:
                entry["step_ratio_vs_one_gpu"] = figures["step_ms"]["mean"] / base["step_ms"]["mean"]
            results[f"{precision}_{res}_{label}"] = entry
            log(f"[{precision} {res}] {label}: {figures['per_image_ms']['mean']:.1f} ms/image, "
                f"{entry['e2e_ratio_vs_one_gpu']:.3f}x one GPU, PSNR {entry['psnr_vs_one_gpu_db']:.1f} dB "
                f"(warm-up incl. compile {warm_s:.1f}s)")
            save(args, results)

    serve_or_measure(pipe, measure)
    del pipe
    dist.barrier()


def save(args, results: dict) -> None:
    """Rank 0 writes what it has so far (a run cut short by a time limit still leaves its figures)."""
    if args.json and dist.get_rank() == 0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2, default=float))


def table(results: dict, precisions, sides, world: int) -> str:
    head = (f"{'precision':<9} {'size':<10} {'variant':<12} {'e2e ms':>9} {'p50':>9} {'step ms':>8} "
            f"{'denoise':>9} {'e2e x1GPU':>9} {'step x1GPU':>10} {'PSNR dB':>8}")
    lines = [head, "-" * len(head)]
    for precision in precisions:
        for res in sides:
            for label in ("one_gpu", f"sp{world}", f"sp{world}_graphs"):
                entry = results.get(f"{precision}_{res}_{label}")
                if entry is None:
                    continue
                step = entry["step_ms"]["mean"] if entry["step_ms"] else float("nan")
                lines.append(
                    f"{precision:<9} {res:<10} {label:<12} {entry['per_image_ms']['mean']:9.1f} "
                    f"{entry['per_image_ms']['p50']:9.1f} {step:8.2f} {entry['denoise_ms']['mean']:9.1f} "
                    f"{entry.get('e2e_ratio_vs_one_gpu', 1.0):9.3f} {entry.get('step_ratio_vs_one_gpu', 1.0):10.3f} "
                    f"{entry.get('psnr_vs_one_gpu_db', float('nan')):8.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="engines/bench-sp", help="where rank 0 builds the engines")
    ap.add_argument("--resolutions", default="1024x1024,2048x2048", help="comma-separated WIDTHxHEIGHT")
    ap.add_argument("--precisions", default="fp16,fp8", help="comma-separated engine precisions")
    ap.add_argument("--images", type=int, default=3, help="images timed per (precision, size, variant) up to 1024²")
    ap.add_argument("--large-images", type=int, default=2, help="images timed per (precision, size, variant) above 1024²")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first (compiles the SP graphs)")
    ap.add_argument("--cuda-graph", default="both", choices=("off", "on", "both"),
                    help="sequence-parallel steps captured in CUDA graphs (NCCL collectives included)")
    ap.add_argument("--engine", default="compiled", choices=("compiled", "eager"),
                    help="torch-compiled engines (built by rank 0), or the eager denoiser (quick smoke test)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model: a smoke test of this script")
    ap.add_argument("--device", default=None, help="cuda (one GPU per rank) or cpu (gloo)")
    ap.add_argument("--json", default=None, help="write every figure here (default: $OUT/sequence_parallel.json)")
    ap.add_argument("--reuse-engines", action="store_true",
                    help="skip the build when --out already holds the engine (same seeded random weights)")
    ap.add_argument("--degrees", default=None,
                    help="run without torchrun: one `torchrun --nproc-per-node D` of this script per degree "
                         "(e.g. 2,4,8), then one table")
    args = ap.parse_args()
    if args.degrees:
        return run_degrees(args)
    args.resolutions = [r for r in args.resolutions.split(",") if r]
    precisions = [p for p in args.precisions.split(",") if p]
    if args.tiny and args.resolutions == ["1024x1024", "2048x2048"]:
        args.resolutions = ["256x256", "512x512"]
    if args.tiny and precisions == ["fp16", "fp8"] and args.device == "cpu":
        precisions = ["fp32"]  # (fp16/fp8 kernels are GPU-only)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    args.device_obj = device
    # One group for the whole run, with room for rank 0's one-GPU phase while the others wait at a barrier.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=1800),
                            device_id=device if device.type == "cuda" else None)
    world = dist.get_world_size()
    results = {"env": environment(), "world": world, "args": {k: str(v) for k, v in vars(args).items()}}
    heads = 2 if args.tiny else 30  # (the tiny model's, Z-Image-Turbo's)
    results.update(heads=heads, padded_heads=padded_heads(world, heads))
    log(results["env"], f"world {world}")
    args.json = args.json or (str(Path(os.environ["OUT"]) / "sequence_parallel.json") if os.environ.get("OUT") else None)
    started = time.perf_counter()
    try:
        # Without CUDA graphs first, for every precision; steps captured with their collectives last, so
        # that a capture failing cannot cost the other figures.
        parts, references = {}, {}
        for precision in precisions:
            parts[precision] = prepare(args, precision, results)
            measure_one_gpu(args, parts[precision], precision, results, references)
            if args.cuda_graph != "on":
                measure_parallel(args, parts[precision], precision, False, results, references)
        if args.cuda_graph != "off":
            for precision in precisions:
                measure_parallel(args, parts[precision], precision, True, results, references)
    finally:
        results["total_s"] = time.perf_counter() - started
        if dist.get_rank() == 0:
            print(table(results, precisions, args.resolutions, world), flush=True)
            print(f"total {results['total_s']:.0f}s", flush=True)
            save(args, results)
            if args.json:
                print(f"wrote {args.json}", flush=True)
        dist.destroy_process_group()
    return 0


def run_degrees(args) -> int:
    """One torchrun per degree (this script again, --reuse-engines after the first), then one table."""
    import subprocess
    import sys

    degrees = [int(d) for d in args.degrees.split(",") if d]
    base = [a for a in sys.argv[1:]]
    skip = {"--degrees", "--json"}
    argv, i = [], 0
    while i < len(base):
        flag = base[i].split("=", 1)[0]
        if flag in skip:
            i += 1 if "=" in base[i] else 2
            continue
        argv.append(base[i])
        i += 1
    out_dir = Path(args.json).parent if args.json else Path(os.environ.get("OUT", "."))
    merged, started = {"degrees": degrees, "runs": {}}, time.perf_counter()
    for n, degree in enumerate(degrees):
        path = out_dir / f"sequence_parallel_sp{degree}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(degree), __file__, *argv,
                   "--json", str(path), *(["--reuse-engines"] if n and "--reuse-engines" not in argv else [])]
        print("$", " ".join(command), flush=True)
        code = subprocess.call(command)
        if path.is_file():
            merged["runs"][degree] = json.loads(path.read_text())
        if code:
            print(f"degree {degree}: torchrun exited {code}", flush=True)
    print(degree_table(merged), flush=True)
    merged["total_s"] = time.perf_counter() - started
    if args.json:
        atomic_write_text(args.json, json.dumps(merged, indent=2, default=float))
        print(f"wrote {args.json}", flush=True)
    return 0


def degree_table(merged: dict) -> str:
    """Per precision and size: each run's one-GPU ms and its SP ms (best of with / without CUDA graphs)."""
    head = f"{'precision':<9} {'size':<10} {'degree':>6} {'pad':>4} {'one GPU ms':>10} {'SP ms':>9} {'x one GPU':>9} {'PSNR':>6}"
    lines = [head, "-" * len(head)]
    for degree, run in sorted(merged["runs"].items(), key=lambda item: int(item[0])):
        for key, entry in run.items():
            if not isinstance(entry, dict) or not key.endswith("_one_gpu"):
                continue
            precision, res = key.split("_")[:2]
            variants = [run.get(f"{precision}_{res}_sp{degree}{g}") for g in ("", "_graphs")]
            best = min((v for v in variants if v), key=lambda v: v["per_image_ms"]["mean"], default=None)
            if best is None:
                continue
            lines.append(f"{precision:<9} {res:<10} {degree:>6} {run.get('padded_heads', 0):>4} "
                         f"{entry['per_image_ms']['mean']:10.1f} {best['per_image_ms']['mean']:9.1f} "
                         f"{best['e2e_ratio_vs_one_gpu']:9.3f} {best['psnr_vs_one_gpu_db']:6.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
