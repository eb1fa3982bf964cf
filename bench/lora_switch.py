"""LoRA on a warm engine: time to load two adapters, to switch between them, and the step time with an
adapter fused against none; fp16 (torch-compiled engine) and FP8 (torch-compiled FP8 engine).

Full-size Z-Image-Turbo architecture with random weights (the timings do not depend on the values),
1024x1024, two rank-32 adapters over every block's attention (to_q, to_k, to_v, to_out.0) and
feed-forward (w1, w2, w3) projections, saved as diffusers-format safetensors and loaded from disk.
FP8 layers keep no 16-bit weights: the transformer is saved to a folder first, from which the first
adapter load reads the touched layers' 16-bit weights (kept in pinned CPU memory after that).

    python bench/lora_switch.py --json lora.json          # H100: about 4 minutes
    python bench/lora_switch.py --tiny --device cpu       # smoke test of this script (eager engine)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from zimage_trt import ZImageTRTPipeline, build_engines
from zimage_trt.benchmark.common import PROMPT_160, environment
from zimage_trt.benchmark.pipeline_speed import components

TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def write_adapter(transformer, rank: int, seed: int, path: Path) -> int:
    """A random rank-`rank` LoRA over TARGETS of every block, diffusers' layout; returns its bytes."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for group in ("noise_refiner", "context_refiner", "layers"):
        for index, block in enumerate(getattr(transformer, group)):
            for target in TARGETS:
                layer = block.get_submodule(target)
                name = f"transformer.{group}.{index}.{target}"
                state[f"{name}.lora_A.weight"] = (torch.randn(rank, layer.in_features, generator=gen) * 0.01).half()
                state[f"{name}.lora_B.weight"] = (torch.randn(layer.out_features, rank, generator=gen) * 0.001).half()
    save_file(state, path)
    return path.stat().st_size


def timed(device, fn) -> float:
    """Wall seconds of fn, the GPU's work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def step_ms(pipe, images: int, size: dict, steps: int) -> float:
    """Mean denoising step (CUDA events on the GPU; wall time per step on the CPU)."""
    times = []
    for i in range(images):
        out = pipe(PROMPT_160, generator=torch.Generator(pipe.device).manual_seed(i), output_type="latent",
                   num_inference_steps=steps, **size)
        times.extend(out.timings.step_ms)
    return statistics.mean(times)


def measure(label: str, pipe, files, size, args) -> dict:
    device = pipe.device
    result = {"variant": label}
    pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(0), output_type="latent",
         num_inference_steps=args.steps, **size)  # warm: engine open, graphs captured
    result["step_ms_no_adapter"] = step_ms(pipe, args.images, size, args.steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["load_a_s"] = timed(device, lambda: pipe.load_lora_weights(files[0], adapter_name="a"))
        result["load_b_s"] = timed(device, lambda: pipe.load_lora_weights(files[1], adapter_name="b"))
        switches = [timed(device, lambda n=name: pipe.set_adapters(n)) for name in ("a", "b") * args.switches]
        result["switch_s_mean"] = statistics.mean(switches)
        result["switch_s_max"] = max(switches)
        result["both_weighted_s"] = timed(device, lambda: pipe.set_adapters(["a", "b"], [0.7, 0.5]))
        result["fuse_s"] = timed(device, lambda: pipe.fuse_lora(lora_scale=1.0))
    result["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})
    result["step_ms_fused"] = step_ms(pipe, args.images, size, args.steps)
    result["unfuse_s"] = timed(device, pipe.unfuse_lora)
    result["unload_s"] = timed(device, pipe.unload_lora_weights)
    return result


def print_table(rows: list[dict]) -> None:
    cols = [("load_a_s", "load A s"), ("load_b_s", "load B s"), ("switch_s_mean", "switch s"),
            ("switch_s_max", "switch max s"), ("both_weighted_s", "A+B s"), ("unload_s", "unload s"),
            ("step_ms_no_adapter", "step ms, none"), ("step_ms_fused", "step ms, fused")]
    print("| variant | " + " | ".join(c[1] for c in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for row in rows:
        print(f"| {row['variant']} | " + " | ".join(f"{row[c[0]]:.3f}" for c in cols) + " |")
    for row in rows:
        for line in row["warnings"]:
            print(f"{row['variant']}: {line}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model and eager engines (a smoke test)")
    ap.add_argument("--device", default="cuda", help="device to run on")
    ap.add_argument("--rank", type=int, default=32, help="rank of the two adapters")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    ap.add_argument("--images", type=int, default=2, help="images timed per step-time figure")
    ap.add_argument("--switches", type=int, default=3, help="A -> B -> A round trips timed")
    ap.add_argument("--variants", nargs="+", default=["fp16", "fp8"], choices=["fp16", "fp8"],
                    help="which engines to measure")
    ap.add_argument("--work", default=None, help="folder for engines, adapters, the saved transformer "
                    "(default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    side = 256 if args.tiny else 1024
    size = {"height": side, "width": side}
    work = Path(args.work or tempfile.mkdtemp(prefix="lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"env": environment(), "args": vars(args), "rows": []}
    print(results["env"], flush=True)

    for variant in args.variants:
        started = time.perf_counter()
        dtype = torch.float16 if variant == "fp16" else torch.bfloat16
        parts = components(args.tiny, device, dtype)
        if args.tiny:
            for key in ("transformer", "vae", "text_encoder"):
                torch.nn.Module.to(parts[key], dtype)
        files = [work / f"adapter_{name}.safetensors" for name in "ab"]
        if not files[0].exists():
            sizes = [write_adapter(parts["transformer"], args.rank, seed, f) for seed, f in enumerate(files)]
            print(f"adapters: rank {args.rank}, {sizes[0] / 2**20:.1f} MiB each", flush=True)
        options = dict(device=device, torch_dtype=dtype, compile_vae=False)
        if variant == "fp8":
            # FP8 layers keep no 16-bit weights; LoRA reads the touched ones from the model's folder.
            parts["transformer"].save_pretrained(work / "transformer")
            parts["transformer"].register_to_config(_name_or_path=str(work / "transformer"))
            options.update(precision="fp8", text_encoder_fp8=False)
        engine_dir = None
        if not args.tiny:
            engine_dir = work / f"engines-{variant}"
            build_engines(parts["transformer"], [f"{side}x{side}"], engine_dir, backend="torch-compiled",
                          precision=variant, caption_capacity=512, progress=False, vae=False)
        pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=engine_dir, **options)
        pipe.set_progress_bar_config(disable=True)
        engine_kind = "eager" if engine_dir is None else "torch-compiled"
        row = measure(f"{variant} {engine_kind} {side}x{side}", pipe, files, size, args)
        row["setup_and_measure_s"] = time.perf_counter() - started
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        pipe.close()
        del pipe, parts
        # The next variant starts clean: compiled graphs (and the weights they reference) let go.
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(results["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
