"""`zimage-trt build | generate | bench | compare | demo | serve | doctor` — the command line over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import compare
from .benchmark import pipeline_speed
from .compiler.build import BACKEND_NAMES, DEFAULT_CAPTION_CAPACITY, build_engines
from .compiler.controlnet_places import parse_places
from .demo import demo
from .model.attention import BACKENDS as ATTENTION_BACKENDS
from .model.precision import DEFAULT_PRECISION_RULE, PRECISIONS, RUN_PRECISION_RULE, precision_dtype, run_precision
from .pipeline import ZImageTRTPipeline
from .runtime import gpu_health
from . import serving, tasks
from .serving import ray_settings
from .serving import settings as serve_settings

PRECISION_HELP = f"default: {DEFAULT_PRECISION_RULE}, the same rule for build and generate"
ENGINE_DIR_HELP = "engine folder (the same --engine-dir in build, generate, bench and serve)"


def add_hidden_alias(ap: argparse.ArgumentParser, old_name: str, dest: str) -> None:
    """`old_name` still works as another spelling of `dest`'s option, without a line in --help."""
    ap.add_argument(old_name, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help (argparse's), except where the help says it in words
    (a default computed at run time) and for required options, whose help says so."""

    def _get_help_string(self, action):
        if action.required or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def places_argument(text: str) -> tuple[int, ...]:
    """--controlnet-places: parse_places' own message instead of argparse's 'invalid value'."""
    try:
        return parse_places(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_build_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="required: diffusers-format folder (with transformer/), or a hub id such as Tongyi-MAI/Z-Image-Turbo")
    ap.add_argument("--resolution", action="append", required=True,
                    help="required: WIDTHxHEIGHT in pixels (1344x768: 1344 wide, 768 tall), multiples of 16 that "
                         "the model's RoPE tables hold (8192 for Z-Image-Turbo), from 128 for TensorRT; repeat for "
                         "several (one engine holds all)")
    ap.add_argument("--engine-dir", default="engines", help=ENGINE_DIR_HELP)
    add_hidden_alias(ap, "--out", "engine_dir")  # the old name, hidden: scripts keep working
    ap.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                    help="auto: TensorRT where it runs, else the PyTorch-native compiled format")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="engine precision; fp16 is overflow-rescaled at build time; bf16 is Z-Image's training dtype; "
                         "fp8: e4m3 projections + bf16 elsewhere (torch-compiled backend, Hopper/Ada GPUs) "
                         f"({PRECISION_HELP})")
    ap.add_argument("--batch", type=int, default=1, help="images per engine call")
    ap.add_argument("--caption-capacity", type=int, default=DEFAULT_CAPTION_CAPACITY,
                    help="caption rows the engine takes, a multiple of 32 (512 = diffusers' max_sequence_length)")
    ap.add_argument("--compute-capability", action="append", default=None,
                    help="TensorRT-RTX target GPU, e.g. 8.9 or 12.0; repeat for several (default: this GPU, else all "
                         "that TensorRT-RTX supports)")
    ap.add_argument("--name", default=None, help="engine name (default: denoiser-BACKEND-PRECISION)")
    ap.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                    help="torch-compiled engines: auto = FlashAttention-3 where it runs (pip install zimage_trt[fa3], "
                         "Hopper; on e4m3 q, k, v in FP8 engines), else SDPA; fa3-fp8 = FA3 on e4m3 q, k, v")
    ap.add_argument("--fp8-keep", default="auto",
                    help="FP8 engines: blocks kept bf16. auto = measure each block's sensitivity to FP8 on this "
                         "checkpoint and keep the outliers; none; or names such as layers.29,noise_refiner.0")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--refittable", action="store_true",
                    help="TensorRT: let LoRA replace the weights later without a rebuild (a refit); costs a larger "
                         "engine file and possibly slower kernels (no weight-specialised ones); not for fp8")
    control = ap.add_mutually_exclusive_group()
    control.add_argument("--controlnet", default=None, metavar="PATH",
                         help="TensorRT: build the ControlNet-ready engine for this ZImageControlNetModel (a diffusers "
                              "folder, whose config.json gives control_layers_places, or one .safetensors file, "
                              "recognised by diffusers' loader); torch-compiled engines take any ControlNet's hints "
                              "at run time, so there it is only checked (default: a plain engine)")
    control.add_argument("--controlnet-places", default=None, type=places_argument, metavar="0,2,...",
                         help="TensorRT: build the ControlNet-ready engine for these main-layer places, in hint order "
                              "(Union 2.x: 0,2,4,...,28) (default: a plain engine)")


def run_build(args) -> int:
    result = build_engines(  # (precision None: build_engines applies the default rule)
        args.model, args.resolution, args.engine_dir, backend=args.backend, precision=args.precision, batch=args.batch,
        caption_capacity=args.caption_capacity, compute_capabilities=args.compute_capability, name=args.name,
        progress=not args.quiet, refittable=args.refittable,
        attention_backend=args.attention_backend, fp8_keep=args.fp8_keep,
        controlnet=args.controlnet if args.controlnet is not None else args.controlnet_places,
    )
    m = result.manifest
    shapes = ", ".join(s.resolution for s in m.shapes)
    print(f"built {m.name}: {m.backend} {m.backend_version}, {m.precision}, {shapes}, "
          f"{sum(f.bytes for f in m.files) / 2**20:.1f} MiB in {result.seconds:.1f}s")
    if m.backend == "torch-compiled":
        print(f"attention: {m.attention_backend}; fused kernels: {m.fused_kernels}"
              + (f"; FP8 blocks kept bf16: {m.fp8_keep or 'none'}" if m.precision == "fp8" else ""))
    if m.controlnet_places:
        print(f"ControlNet-ready: hints after main layers {m.controlnet_places}")
    elif result.details.get("controlnet"):
        print(f"ControlNet: {result.details['controlnet']}")
    print(f"manifest: {result.manifest_path}")
    return 0


def generate_precision(precision: str | None, device: str | None) -> str:
    """The precision asked for, else RUN_PRECISION_RULE's for where the pipeline runs (generate always
    looks for engines: --engine-dir has a default)."""
    return run_precision(precision, device, with_engines=True)


def add_task_arguments(g: argparse.ArgumentParser) -> None:
    """generate's image tasks: image to image, inpainting, ControlNet (tasks/)."""
    g.add_argument("--image", default=None,
                   help="image to image: the starting image (a PNG/JPEG/WebP file), resized to the output size "
                        "(default: none, text to image)")
    g.add_argument("--mask", default=None, help="with --image: inpaint where this mask (same size) is white (default: none)")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of --image to repaint, 0..1 (default: 0.6 for image to image, 1.0 with --mask: "
                        "diffusers')")
    g.add_argument("--control-image", default=None, help="with --controlnet: the control image (pose, edges, depth...) (default: none)")
    serve_settings.add_controlnet_arguments(
        g, "with --mask and --image it inpaints (a 33-channel one) (default: none)")


def task_for(args):
    """(pipeline class, its from_pretrained extras, the call's extras) for generate's task options."""
    from PIL import Image

    def read(path, mode):
        with Image.open(path) as image:
            return image.convert(mode)

    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (the image to inpaint)")
    if (args.controlnet is None) != (args.control_image is None):
        raise ValueError("--controlnet and --control-image go together")
    call = {} if args.strength is None else {"strength": args.strength}
    if args.image is not None:
        call["image"] = read(args.image, "RGB")
    if args.mask is not None:
        call["mask_image"] = read(args.mask, "L")
    if args.controlnet is None:
        cls = tasks.ZImageTRTInpaintPipeline if args.mask else tasks.ZImageTRTImg2ImgPipeline if args.image else None
        return cls or ZImageTRTPipeline, {}, call
    if args.strength is not None:
        raise ValueError("--strength is for --image without --controlnet (diffusers' ControlNet pipelines take none)")
    if args.image is not None and args.mask is None:
        raise ValueError("--image with --controlnet needs --mask (ControlNet inpainting)")
    scale = serve_settings.control_scale(args.control_scale)  # (before any file is read)
    call.update(control_image=read(args.control_image, "RGB"), controlnet_conditioning_scale=scale)
    cls = tasks.ZImageTRTControlNetInpaintPipeline if args.mask else tasks.ZImageTRTControlNetPipeline
    return cls, {"controlnet": args.controlnet, "controlnet_config": args.controlnet_config}, call


def run_generate(args) -> int:
    import torch

    precision = generate_precision(args.precision, args.device)
    cls, parts, task_call = task_for(args)
    pipe = cls.from_pretrained(args.model, engine_dir=args.engine_dir, device=args.device,
                               torch_dtype=precision_dtype(precision), precision=precision,
                               allow_fallback=args.allow_fallback,
                               sequence_parallel=args.sequence_parallel, **parts)
    with pipe:  # (closing releases the other ranks of a sequence-parallel run)
        if not pipe.is_main_process:
            pipe.serve()  # rank 0 writes the image; this rank computes its share of each step
            return 0
        generator = torch.Generator(pipe.device).manual_seed(args.seed)
        out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, negative_prompt=args.negative_prompt, generator=generator, **task_call)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(args.output)
    print(f"wrote {args.output} in {out.timings.total_ms:.0f} ms "
          f"(text {out.timings.text_encode_ms:.0f}, denoise {out.timings.denoise_ms:.0f}, vae {out.timings.vae_decode_ms:.0f})")
    return 0


def run_demo(args) -> int:
    summary = demo(Path(args.out), seed=args.seed, prompt=args.prompt, tensorrt_rtx=args.tensorrt_rtx)
    print(json.dumps(summary, indent=2))
    return 0


def run_doctor(args) -> int:
    report = gpu_health.doctor_report(args.device)
    print(json.dumps(report, indent=2) if args.json else gpu_health.render_text(report))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zimage-trt", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    defaults = HelpFormatter  # every --help shows each option's default

    b = sub.add_parser("build", help="export the denoiser and compile engines for fixed resolutions",
                       formatter_class=defaults)
    add_build_arguments(b)
    b.set_defaults(func=run_build)

    g = sub.add_parser("generate", help="text (and image, mask, control image) to image with built engines",
                       formatter_class=defaults)
    g.add_argument("--model", required=True, help="required: diffusers-format folder (or hub id) the engines were built from")
    g.add_argument("--engine-dir", default="engines", help=ENGINE_DIR_HELP)
    add_hidden_alias(g, "--engines", "engine_dir")  # the old name, hidden
    g.add_argument("--prompt", required=True, help="required: what to draw")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from, with --guidance > 0 (default: none, the empty prompt as diffusers)")
    g.add_argument("--height", type=int, default=1024,
                   help="pixels, a multiple of 16 the model's RoPE tables hold (8192 for Z-Image-Turbo)")
    g.add_argument("--width", type=int, default=1024,
                   help="pixels, a multiple of 16 the model's RoPE tables hold (8192 for Z-Image-Turbo)")
    g.add_argument("--steps", type=int, default=8, help="denoising steps (Turbo: 8)")
    g.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (Turbo: 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    g.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help=f"engine precision to look for, and the pipeline's dtype (default: {RUN_PRECISION_RULE}; "
                        "the same rule as serve)")
    g.add_argument("--allow-fallback", action="store_true",
                   help="run eager PyTorch if no engine fits (slower; eager fp16 may overflow: add --precision bf16)")
    g.add_argument("--output", default="out/image.png", help="PNG file to write")
    g.add_argument("--sequence-parallel", type=int, default=1,
                   help="processes making the image together, one per GPU: run under "
                        "`torchrun --nproc-per-node N -m zimage_trt.cli generate ... --sequence-parallel N`; "
                        "N from 2 up to the model's attention heads (30); where N does not divide them (4, 8) they "
                        "are padded with zero heads")
    add_task_arguments(g)
    g.set_defaults(func=run_generate)

    be = sub.add_parser("bench", help="our pipeline against diffusers' on this GPU (full-size, random weights)",
                        formatter_class=defaults)
    pipeline_speed.add_arguments(be)
    add_hidden_alias(be, "--out", "engine_dir")  # the old name, hidden
    be.set_defaults(func=pipeline_speed.run)

    c = sub.add_parser("compare", help="render prompts in two settings (fp16 vs fp8, ours vs diffusers, LoRA, keep "
                       "lists): a contact sheet and a PSNR / SSIM table", formatter_class=defaults)
    compare.add_arguments(c)
    c.set_defaults(func=compare.run)

    d = sub.add_parser("demo", help="offline: tiny random model -> engines -> an image through an engine, on CPU if need be",
                       formatter_class=defaults)
    d.add_argument("--out", default="out/demo", help="folder for the model, engines and image")
    d.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    d.add_argument("--prompt", default="a red fox in fresh snow at dawn", help="what to draw")
    d.add_argument("--tensorrt-rtx", action=argparse.BooleanOptionalAction, default=None,
                   help="also build a TensorRT-RTX engine (it runs on RTX-class GPUs; elsewhere it is built and its "
                        "manifest checked) (default: when tensorrt-rtx is installed)")
    d.set_defaults(func=run_demo)

    sv = sub.add_parser("serve", help="HTTP service with a live dashboard in front of one pipeline (needs the serve extra)",
                        formatter_class=defaults)
    serve_settings.add_arguments(sv)
    ray_settings.add_ray_arguments(sv)
    sv.set_defaults(func=lambda args: serving.run_ray_server(args) if args.ray else serving.run_server(args))

    dr = sub.add_parser("doctor", help="check this GPU for a steady service (NVML): clocks, throttling, heat, power, "
                                       "other processes, memory, ECC, MIG, PCIe", formatter_class=defaults)
    dr.add_argument("--device", type=int, default=0, help="the GPU's index as nvidia-smi numbers them")
    dr.add_argument("--json", action="store_true", help="print the checklist as JSON (for scripts)")
    dr.set_defaults(func=run_doctor)

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
