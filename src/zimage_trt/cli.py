"""`zimage-trt build | generate | bench | demo` — the command line over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .build import BACKEND_NAMES, DEFAULT_CAPTION_CAPACITY


def add_build_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="diffusers-format folder (with transformer/), or a hub id such as Tongyi-MAI/Z-Image-Turbo")
    ap.add_argument("--resolution", action="append", required=True,
                    help="HEIGHTxWIDTH in pixels, multiples of 16 in 256..2048; repeat for several (one engine holds all)")
    ap.add_argument("--out", default="engines", help="engine folder (default: engines/)")
    ap.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                    help="auto: TensorRT where it runs, else the PyTorch-native compiled format")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32", "fp8"),
                    help="fp8: e4m3 projections + bf16 elsewhere (torch-compiled backend, Hopper/Ada GPUs)")
    ap.add_argument("--batch", type=int, default=1, help="images per engine call (default 1)")
    ap.add_argument("--caption-capacity", type=int, default=DEFAULT_CAPTION_CAPACITY,
                    help="caption rows the engine takes, a multiple of 32 (default 512 = diffusers' max_sequence_length)")
    ap.add_argument("--compute-capability", action="append", default=None,
                    help="TensorRT-RTX target GPU, e.g. 8.9 or 12.0; repeat for several (default: this GPU, else all)")
    ap.add_argument("--name", default=None, help="engine name (default denoiser-BACKEND-PRECISION)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def run_build(args) -> int:
    from .build import build_engines

    result = build_engines(
        args.model, args.resolution, args.out, backend=args.backend, precision=args.precision, batch=args.batch,
        caption_capacity=args.caption_capacity, compute_capabilities=args.compute_capability, name=args.name,
        progress=not args.quiet,
    )
    m = result.manifest
    shapes = ", ".join(s.resolution for s in m.shapes)
    print(f"built {m.name}: {m.backend} {m.backend_version}, {m.precision}, {shapes}, "
          f"{sum(f.bytes for f in m.files) / 2**20:.1f} MiB in {result.seconds:.1f}s")
    print(f"manifest: {result.manifest_path}")
    return 0


def run_generate(args) -> int:
    import torch

    from .pipeline import ZImageTRTPipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
    pipe = ZImageTRTPipeline.from_pretrained(args.model, engine_dir=args.engines, device=args.device,
                                             torch_dtype=dtype[args.precision] if args.precision else None,
                                             precision=args.precision, allow_fallback=args.allow_fallback)
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
               guidance_scale=args.guidance, negative_prompt=args.negative_prompt, generator=generator)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(args.output)
    print(f"wrote {args.output} in {out.timings.total_ms:.0f} ms "
          f"(text {out.timings.text_encode_ms:.0f}, denoise {out.timings.denoise_ms:.0f}, vae {out.timings.vae_decode_ms:.0f})")
    return 0


def run_bench(args) -> int:
    """Runs bench/pipeline_speed.py's measurement (ours and the diffusers peers in one process)."""
    script = Path(__file__).resolve().parents[2] / "bench" / "pipeline_speed.py"
    if not script.exists():
        print("zimage-trt bench runs from a source checkout (bench/pipeline_speed.py)", file=sys.stderr)
        return 2
    argv = [sys.executable, str(script), "--out", args.out, "--images", str(args.images)]
    if args.json:
        argv += ["--json", args.json]
    if args.compare != "diffusers":
        argv.append("--skip-peers")
    os.execv(sys.executable, argv)
    return 0  # not reached


def run_demo(args) -> int:
    from .demo import demo

    summary = demo(Path(args.out), seed=args.seed, prompt=args.prompt)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zimage-trt", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export the denoiser and compile engines for fixed resolutions")
    add_build_arguments(b)
    b.set_defaults(func=run_build)

    g = sub.add_parser("generate", help="text to image with built engines")
    g.add_argument("--model", required=True)
    g.add_argument("--engines", default="engines")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--guidance", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--precision", default=None, choices=("fp16", "bf16", "fp32", "fp8"),
                   help="engine precision to use (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--allow-fallback", action="store_true", help="run eager PyTorch if no engine fits (slower)")
    g.add_argument("--output", default="out/image.png")
    g.set_defaults(func=run_generate)

    be = sub.add_parser("bench", help="our pipeline against diffusers' on this GPU (full-size, random weights)")
    be.add_argument("--compare", default="diffusers", choices=("diffusers", "none"))
    be.add_argument("--out", default="engines/bench")
    be.add_argument("--images", type=int, default=20)
    be.add_argument("--json", default=None)
    be.set_defaults(func=run_bench)

    d = sub.add_parser("demo", help="offline: tiny random model -> engines -> an image, on CPU if need be")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--prompt", default="a red fox in fresh snow at dawn")
    d.set_defaults(func=run_demo)

    args = ap.parse_args(argv)
    started = time.perf_counter()
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"zimage-trt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zimage-trt {args.command}: interrupted after {time.perf_counter() - started:.0f}s; nothing half-written was kept",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
