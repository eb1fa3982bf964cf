"""Speed III (issue 21) in one device call: every contender and probe, each a phased job in its own
process (src/zimage_trt/benchmark/phased.py), in two waves that fit one H200.

Wave 1 (prepared together, then timed one at a time): ours fp16, ours FP8 (defaults), ours FP8 with
both Speed III switches on (FP8 epilogue GEMM, text-encoder FP8 kernel), diffusers eager (the PSNR
reference), the VAE probe (bench/vae_probe.py) and the FP8 kernel probe (bench/speed2_probe.py
--parts epilogue,text: the switches alone, one block, one step, the text stage).
Wave 2: diffusers + compile_repeated_blocks + compiled VAE, cache-dit on it (6 of 8 steps), torchao
FP8 on it (its prepare bounded by --torchao-timeout). A job that is missing a package, fails, or does
not finish in its time is reported and the rest goes on; every wait also ends at --budget-s.

Writes OUT/speed3.json (every figure), OUT/speed3.log (what it prints), OUT/logs/JOB.log (each job's
own output), OUT/images/ (each contender's image at the quality seed), OUT/vae_probe.json, OUT/kernels.json.

    PYTHONPATH=src:/tmp/site python bench/speed3.py --out $OUT
    PYTHONPATH=src python bench/speed3.py --tiny --out /tmp/s3     # the plumbing on a CPU, in seconds
"""

import argparse
import json
import sys
import time
from pathlib import Path

from zimage_trt.benchmark import phased, quality
from zimage_trt.benchmark.common import Log, environment
from zimage_trt.benchmark.peers import peer_job
from zimage_trt.files import atomic_write_text

BENCH = Path(__file__).resolve().parent
QUALITY_SEED = 4321


def waves(args, out: Path) -> list[list[phased.Job]]:
    side = 64 if args.tiny else 1024
    images = 2 if args.tiny else args.images
    peer_images = 1 if args.tiny else args.peer_images
    common = dict(tiny=args.tiny, side=side, quality_seed=QUALITY_SEED, image_dir=out / "images",
                  compile_cache=args.compile_cache, warmup=1 if args.tiny else 2)
    tiny_ours = ["--no-build"] if args.tiny else []

    def ours(label, *flags):
        return peer_job("ours", label=label, images=images, prepare_timeout_s=args.prepare_timeout,
                        extra=[*flags, *tiny_ours, "--engines", str(out / f"engines-{label}")], **common)

    def peer(name, timeout, count=peer_images):
        return peer_job(name, images=count, prepare_timeout_s=timeout, **common)

    vae = [sys.executable, str(BENCH / "vae_probe.py"), "--json", str(out / "vae_probe.json"), "--variants",
           "eager-bf16,compiled-bf16,compiled-fp16,compiled-bf16-cl,compiled-fp16-cl,compiled-bf16-cudnn-bench,"
           "compiled-bf16-coord-descent"]
    if args.tiny:
        vae += ["--smoke", "--side", "64", "--iters", "2", "--variants", "eager-bf16,eager-fp16"]
    kernels = [sys.executable, str(BENCH / "speed2_probe.py"), "--parts", "epilogue,text", "--json", str(out / "kernels.json")]
    first = [
        ours("ours-fp8", "--precision", "fp8"),
        ours("ours-fp16", "--precision", "fp16"),
        peer("diffusers-eager", args.prepare_timeout),
        ours("ours-fp8-switches", "--precision", "fp8", "--fp8-epilogues", "on", "--text-fp8-kernel", "on"),
        phased.Job("vae-probe", vae, prepare_timeout_s=args.prepare_timeout, measure_timeout_s=240),
    ]
    if not args.tiny:  # (it times CUDA kernels only)
        first.append(phased.Job("kernel-probe", kernels, prepare_timeout_s=args.prepare_timeout, measure_timeout_s=180))
    second = [peer("diffusers-compiled", args.prepare_timeout), peer("cache-dit", args.prepare_timeout),
              peer("torchao-fp8", args.torchao_timeout)]
    for job in first + second:  # 6 compiling processes on 16 cores: a few compile workers each is plenty
        job.env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")
    if args.jobs:  # a subset, in the same waves (e.g. a second call for what the first could not fit)
        wanted = [name.strip() for name in args.jobs.split(",") if name.strip()]
        known = [job.name for job in first + second]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise SystemExit(f"--jobs names unknown jobs {unknown}; the jobs are {known}")
        first, second = ([job for job in wave if job.name in wanted] for wave in (first, second))
    return [wave for wave in (first, second) if wave]


def cached_steps(outcome: dict) -> str:
    """cache-dit's own count of the steps it served from its cache (none means it ran as the compiled peer)."""
    steps = outcome.get("cache_dit_cached_steps")
    return "" if steps is None else f" cached steps {steps if steps else 'NONE'}"


def summary_lines(results: dict) -> list[str]:
    jobs = results["jobs"]
    lines = ["", "== Speed III summary (ms an image, 1024², 8 steps; PSNR against diffusers eager at one seed) =="]
    for name, outcome in jobs.items():
        if outcome["status"] != "ok":
            lines.append(f"{name:<22} {phased.describe(outcome)}")
        elif "per_image_ms" in outcome:
            s = outcome["per_image_ms"]
            stages = outcome.get("stages")
            split = (" stages text/denoise/VAE {:.1f}/{:.1f}/{:.1f} step {:.2f}".format(
                *(stages[k]["mean"] for k in ("text_encode_ms", "denoise_ms", "vae_decode_ms", "step_ms")))
                if stages else "")
            lines.append(f"{name:<22} mean {s['mean']:8.1f}  p50 {s['p50']:8.1f}  cv {100 * s['cv']:5.2f}%  n {s['count']:<3}"
                         f" PSNR {outcome.get('psnr_vs_eager_db', float('nan')):6.1f} dB  prepare {outcome['prepare_s']:.0f} s"
                         + split + cached_steps(outcome))
        else:
            lines.append(f"{name:<22} done (prepare {outcome['prepare_s']:.0f} s): see its log and JSON")
    for name, value in results.get("ratios", {}).items():
        lines.append(f"{name}: {value:.2f}x")
    return lines


def ratios(jobs: dict) -> dict:
    mean = {n: o["per_image_ms"]["mean"] for n, o in jobs.items() if o["status"] == "ok" and "per_image_ms" in o}
    pairs = [("ours-fp16 vs diffusers-compiled", "diffusers-compiled", "ours-fp16"),
             ("ours-fp16 vs cache-dit", "cache-dit", "ours-fp16"),
             ("ours-fp8 vs torchao-fp8", "torchao-fp8", "ours-fp8"),
             ("ours-fp8-switches vs torchao-fp8", "torchao-fp8", "ours-fp8-switches"),
             ("ours-fp8-switches vs ours-fp8", "ours-fp8", "ours-fp8-switches"),
             ("ours-fp16 vs diffusers-eager", "diffusers-eager", "ours-fp16"),
             ("ours-fp8 vs diffusers-eager", "diffusers-eager", "ours-fp8")]
    return {label: mean[slow] / mean[fast] for label, slow, fast in pairs if slow in mean and fast in mean}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="required: folder for the JSON, the log, job logs and images")
    ap.add_argument("--images", type=int, default=20, help="timed images for each of ours")
    ap.add_argument("--peer-images", type=int, default=5, help="timed images for each diffusers peer")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="every wait ends this many seconds after the start (the device call's limit, less margin)")
    ap.add_argument("--prepare-timeout", type=float, default=300.0, help="bound on one job's prepare phase, s")
    ap.add_argument("--torchao-timeout", type=float, default=200.0, help="bound on the torchao peer's quantise + compile, s")
    ap.add_argument("--compile-cache", default=None,
                    help="folder for the jobs' torch compile caches (a second run skips compilation); default: none")
    ap.add_argument("--jobs", default=None,
                    help="comma-separated job names to run (default: all). Six full-size jobs at once fill an H200's "
                         "memory (seen: ours-fp16 ran out in wave 1): a second call can run what the first could not")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a test of this script")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + args.budget_s
    report = Log(out / "speed3.log", stamp=True, started=started, mode="a")
    results = {"env": environment(), "args": vars(args), "jobs": {}}
    report(f"speed3: {results['env']}")
    for number, wave in enumerate(waves(args, out), start=1):
        if time.perf_counter() > deadline:
            for job in wave:
                results["jobs"][job.name] = {"status": "timeout", "detail": "not started: the budget was spent"}
            continue
        report(f"wave {number}: {', '.join(job.name for job in wave)}")
        results["jobs"].update(phased.run_wave(wave, out / "logs", deadline=deadline, report=report))
    jobs = results["jobs"]
    eager = jobs.get("diffusers-eager", {}).get("quality_image")
    for outcome in jobs.values():
        if eager and outcome.get("quality_image"):
            outcome["psnr_vs_eager_db"] = quality.psnr(quality.load_rgb(outcome["quality_image"]), quality.load_rgb(eager))
    for a, b in (("ours-fp8-switches", "ours-fp8"),):
        if jobs.get(a, {}).get("quality_image") and jobs.get(b, {}).get("quality_image"):
            results[f"psnr_{a}_vs_{b}_db"] = quality.psnr(quality.load_rgb(jobs[a]["quality_image"]), quality.load_rgb(jobs[b]["quality_image"]))
    results["ratios"] = ratios(jobs)
    results["wall_s"] = time.perf_counter() - started
    for line in summary_lines(results):
        report(line)
    report(f"speed3: done in {results['wall_s']:.0f} s")
    atomic_write_text(out / "speed3.json", json.dumps(results, indent=1, default=str))
    report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
