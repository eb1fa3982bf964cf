"""`zimage-trt compare`: the same prompts and seeds rendered in two settings, side by side.

What to run on your own checkpoint before turning FP8 on (naive FP8 is known to ruin trained Z-Image
weights whose sensitive layers are not kept in bf16): setting A and setting B each choose a pipeline
(ours or diffusers' ZImagePipeline), a precision, engines (or a build with an FP8 keep list), and a
LoRA. Every prompt is rendered in A, then in B, at seed --seed + its index, and the command writes

    OUT/sheet.png    one row a prompt: A | B | |A - B| x --magnify, captioned with the row's figures
    OUT/table.json   the settings and, per prompt, PSNR (dB) and SSIM of B against A (and their means)

and prints the table. Identical settings give PSNR inf and SSIM 1. Both files are written whole or not
at all. Figures: benchmark/quality.py (PSNR on 8-bit images, SSIM after Wang et al. 2004).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .benchmark import quality
from .compiler.build import build_engines
from .files import atomic_path, atomic_write_text
from .model.precision import PRECISIONS, default_precision, precision_dtype
from .model.shapes import Resolution
from .pipeline import ZImageTRTPipeline
from .testing.tiny import make_tiny_components

DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow at dawn, soft golden light, 85mm photograph",
    "a bowl of ramen on a wooden table, steam rising, close-up, shallow depth of field",
    "an old lighthouse on a cliff in a storm, dramatic clouds, crashing waves",
    "a portrait of an elderly woman with freckles, natural window light, detailed skin",
    "a neon sign reading OPEN in a rainy city street at night, reflections on wet asphalt",
    "isometric illustration of a tiny cozy library with plants, warm colours",
)
SIDES = ("a", "b")


@dataclass
class Setting:
    pipeline: str  # "ours" or "diffusers"
    precision: str
    engines: str | None
    lora: str | None
    lora_scale: float
    fp8_keep: str | None
    label: str

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("label", "pipeline", "precision", "engines", "lora", "lora_scale", "fp8_keep")}


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width), each a positive multiple of 16."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"--size {text!r}: width and height must be positive multiples of 16")
    return height, width


def read_prompts(path: str | None) -> list[str]:
    """One prompt a line (blank lines and lines starting with # skipped), or the default set."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it (one a line; # starts a comment)")
    return prompts


def setting_from(args, side: str, device: torch.device) -> Setting:
    get = lambda name: getattr(args, f"{side}_{name}")  # noqa: E731
    pipeline = get("pipeline")
    precision = get("precision") or (default_precision(device.type == "cuda") if pipeline == "ours" else
                                     ("bf16" if device.type == "cuda" else "fp32"))
    if pipeline == "diffusers" and (precision == "fp8" or get("engines") or get("fp8_keep")):
        raise ValueError(f"--{side}-pipeline diffusers runs diffusers' own ZImagePipeline: precision fp16, bf16 "
                         f"or fp32, no engines or FP8 keep list (got precision {precision})")
    if get("fp8_keep") and (precision != "fp8" or get("engines")):
        raise ValueError(f"--{side}-fp8-keep builds FP8 engines: it needs --{side}-precision fp8 and no --{side}-engines")
    label = get("label") or " ".join(x for x in (pipeline, precision, get("fp8_keep") and f"keep={get('fp8_keep')}",
                                                 get("lora") and f"lora={Path(get('lora')).name}@{get('lora_scale')}") if x)
    return Setting(pipeline, precision, get("engines"), get("lora"), get("lora_scale"), get("fp8_keep"), label)


def _components(args, dtype):
    if args.tiny:
        return make_tiny_components(seed=0)
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(args.model, torch_dtype=dtype).components


def make_pipeline(args, setting: Setting, side: str, device: torch.device, size: tuple[int, int], components=None):
    """The pipeline of one setting, LoRA loaded; `components(dtype)`, when given, makes its parts (the same
    weights for both settings: bench/compare_sheet.py's full-size random model) instead of --model/--tiny."""
    dtype = precision_dtype(setting.precision)
    parts = components(dtype) if components is not None else _components(args, dtype)
    if setting.pipeline == "diffusers":
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline(**{k: parts[k] for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")})
        pipe.to(device, dtype)
    else:
        engines = setting.engines
        if setting.fp8_keep:  # build FP8 engines with this keep list (the build converts the transformer)
            engines = str(Path(args.out) / f"engines-{side}")
            build_engines(parts["transformer"], [Resolution(*size).key], engines, backend="torch-compiled",
                          precision="fp8", fp8_keep=setting.fp8_keep, progress=not args.quiet, device=device)
        pipe = ZImageTRTPipeline.from_components(
            **{k: parts[k] for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")},
            engine_dir=engines, device=device, torch_dtype=dtype, precision=setting.precision)
    pipe.set_progress_bar_config(disable=args.quiet)
    if setting.lora:
        pipe.load_lora_weights(setting.lora, adapter_name="compare")
        pipe.set_adapters(["compare"], adapter_weights=[setting.lora_scale])
    return pipe


def render(args, setting: Setting, side: str, prompts, device, size, components=None) -> list[np.ndarray]:
    pipe = make_pipeline(args, setting, side, device, size, components)
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, height=size[0], width=size[1], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator(device).manual_seed(args.seed + i))
        images.append(quality.to_8bit(out.images[0]))
    del pipe
    gc.collect()  # (setting B reuses A's memory through the caching allocator: one at a time on the GPU)
    return images


def contact_sheet(rows, labels: tuple[str, str], magnify: float, tile: int):
    """rows: (image_a, image_b, caption) per prompt -> one PIL image, A | B | difference per row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    header, caption_h, pad = 22, 20, 6
    first = rows[0][0]
    scale = min(1.0, tile / max(first.shape[:2]))
    w, h = max(1, round(first.shape[1] * scale)), max(1, round(first.shape[0] * scale))
    sheet = Image.new("RGB", (3 * w + 4 * pad, header + len(rows) * (h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate((f"A: {labels[0]}", f"B: {labels[1]}", f"|A - B| x {magnify:g}")):
        draw.text((pad + col * (w + pad), 5), title, fill="black", font=font)
    for r, (a, b, caption) in enumerate(rows):
        y = header + r * (h + caption_h + pad)
        for col, array in enumerate((a, b, quality.difference_image(a, b, magnify))):
            sheet.paste(Image.fromarray(array).resize((w, h), Image.LANCZOS), (pad + col * (w + pad), y))
        draw.text((pad, y + h + 3), caption, fill="black", font=font)
    return sheet


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def run(args, components=None) -> int:
    size = parse_size(args.size)
    prompts = read_prompts(args.prompts)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if not args.tiny and not args.model and components is None:
        raise ValueError("zimage-trt compare needs --model (a diffusers-format Z-Image folder or hub id), or --tiny")
    if args.magnify <= 0:
        raise ValueError(f"--magnify must be positive, got {args.magnify}")
    settings = [setting_from(args, side, device) for side in SIDES]
    images = [render(args, setting, side, prompts, device, size, components) for setting, side in zip(settings, SIDES)]
    table = []
    for i, (prompt, a, b) in enumerate(zip(prompts, *images)):
        table.append({"prompt": prompt, "seed": args.seed + i, "psnr_db": quality.psnr(a, b), "ssim": quality.ssim(a, b)})
    means = {"psnr_db": float(np.mean([r["psnr_db"] for r in table])), "ssim": float(np.mean([r["ssim"] for r in table]))}
    print(f"A: {settings[0].label}\nB: {settings[1].label}")
    print(f"{'#':>3}  {'PSNR dB':>8}  {'SSIM':>7}  prompt")
    for i, r in enumerate(table):
        print(f"{i:>3}  {_db(r['psnr_db']):>8}  {r['ssim']:7.4f}  {r['prompt'][:70]}")
    print(f"mean  {_db(means['psnr_db']):>8}  {means['ssim']:7.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(a, b, f"{i}: PSNR {_db(r['psnr_db'])} dB, SSIM {r['ssim']:.4f} | {r['prompt'][:60]}")
            for i, (a, b, r) in enumerate(zip(*images, table))]
    sheet = contact_sheet(rows, (settings[0].label, settings[1].label), args.magnify, args.tile)
    with atomic_path(out / "sheet.png") as tmp:
        sheet.save(tmp, format="PNG")
    summary = {"a": settings[0].describe(), "b": settings[1].describe(), "size": args.size, "steps": args.steps,
               "guidance": args.guidance, "prompts": table, "mean": means}
    atomic_write_text(out / "table.json", json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'sheet.png'} and {out / 'table.json'}")
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="diffusers-format Z-Image folder or hub id (default: none; --tiny uses the tiny random model)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (a try on the CPU)")
    ap.add_argument("--prompts", default=None,
                    help=f"file with one prompt a line (# starts a comment) (default: a built-in set of {len(DEFAULT_PROMPTS)})")
    ap.add_argument("--out", default="compare", help="folder for sheet.png and table.json")
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels, multiples of 16")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps (Turbo: 8)")
    ap.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (Turbo: 0)")
    ap.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i, in both settings")
    ap.add_argument("--magnify", type=float, default=8.0, help="the difference column shows |A - B| times this")
    ap.add_argument("--tile", type=int, default=512, help="longest side of each picture on the sheet, pixels")
    ap.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda when available, cpu with --tiny)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    for side, pipeline in (("a", "diffusers"), ("b", "ours")):
        s = side.upper()
        ap.add_argument(f"--{side}-pipeline", default=pipeline, choices=("ours", "diffusers"),
                        help=f"setting {s}: our pipeline or diffusers' ZImagePipeline")
        ap.add_argument(f"--{side}-precision", default=None, choices=PRECISIONS,
                        help=f"setting {s}: precision (default: ours fp16 on a GPU / fp32 on a CPU, the build's rule; "
                             "diffusers bf16 on a GPU / fp32 on a CPU)")
        ap.add_argument(f"--{side}-engines", default=None,
                        help=f"setting {s}: our built engines (default: none, the eager denoiser; fp8 without engines "
                             "converts every block)")
        ap.add_argument(f"--{side}-fp8-keep", default=None,
                        help=f"setting {s}: build FP8 engines into OUT/engines-{side} keeping these blocks bf16: auto, "
                             "none or names such as layers.29,noise_refiner.0 (default: no build)")
        ap.add_argument(f"--{side}-lora", default=None, help=f"setting {s}: a LoRA .safetensors file (default: none)")
        ap.add_argument(f"--{side}-lora-scale", type=float, default=1.0, help=f"setting {s}: the LoRA's weight")
        ap.add_argument(f"--{side}-label", default=None, help=f"setting {s}: its name on the sheet (default: from the options)")
