"""The image tasks on one GPU, in one process: image to image and a Union-2.1-sized ControlNet, ours
against diffusers' `ZImageControlNetPipeline` (eager, and with `compile_repeated_blocks` on both models).

Full-size Z-Image-Turbo architecture (bf16: ours and the peers on the same weights) and a ControlNet
with Union 2.1's config (15 control layers at main
layers 0, 2, ..., 28; 2 control noise-refiner blocks whose hints go into noise-refiner layers 0 and 1;
33 control channels), random weights, 1024x1024, 8 steps, guidance 0. It prints and writes (JSON + log
into --out):

- ours text to image: per image and per step (the reference of the targets);
- ours image to image at strength 0.6: the steps it runs and its denoising time per step, which must
  follow the steps (its time is steps x the text-to-image step, within 10 %);
- f: the ControlNet's share of the step's FLOPs, from the two configs (our ControlNet step also
  recomputes the noise refiner with its hints: counted in f);
- ours ControlNet: per image and per step; target: step <= (1 + f + 0.05) x the text-to-image step;
- diffusers' ControlNet pipeline eager and compiled: per image and per step; target: ours >= 1.5x
  faster per image than the compiled one;
- peak GPU memory of each.

    python bench/image_tasks.py --out results/          # the H200 run (one device call, ~4-5 minutes)
    python bench/image_tasks.py --tiny --out /tmp/t     # CPU smoke test (tests/test_bench_tiny.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..compiler.build import build_engines
from ..files import atomic_write_text
from ..pipeline import ZImageTRTPipeline
from ..runtime.telemetry import summarize
from ..tasks import ZImageTRTControlNetPipeline, ZImageTRTImg2ImgPipeline
from ..testing.tiny import make_tiny_controlnet
from .common import PROMPT_160, Log, _materialise, cuda_time_ms, environment, timed_images
from .pipeline_speed import components

UNION_2_1 = dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1],
                 control_in_dim=33, add_control_noise_refiner="control_noise_refiner", dim=3840, n_refiner_layers=2,
                 n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True)
STRENGTH = 0.6


def block_flops(tokens: int, dim: int) -> float:
    """One transformer block on `tokens`: q, k, v, out and the SwiGLU feed-forward (2 FLOPs per MAC),
    plus attention's two products."""
    hidden = int(dim / 3 * 8)
    return 2.0 * tokens * (4 * dim * dim + 3 * dim * hidden) + 4.0 * tokens * tokens * dim


def step_flops(transformer_config, controlnet_config, image_tokens: int, caption_rows: int) -> tuple[float, float]:
    """(the transformer's FLOPs, our ControlNet's FLOPs) for one image's step."""
    t, c, dim = transformer_config, controlnet_config, int(transformer_config.dim)
    joint = image_tokens + caption_rows
    base = (t.n_layers * block_flops(joint, dim) + t.n_refiner_layers * block_flops(image_tokens, dim)
            + t.n_refiner_layers * block_flops(caption_rows, dim))
    projection = 2.0 * dim * dim
    control = 2.0 * image_tokens * 4 * c.control_in_dim * dim  # the control context's embedder
    control += len(c.control_layers_places) * (block_flops(joint, dim) + projection * joint) + projection * joint
    if c.add_control_noise_refiner == "control_noise_refiner":
        refiner_hints = len(c.control_refiner_layers_places)
        control += c.n_refiner_layers * block_flops(image_tokens, dim) + projection * image_tokens * (1 + refiner_hints)
        control += t.n_refiner_layers * block_flops(image_tokens, dim)  # the hinted noise refiner, recomputed
    elif c.add_control_noise_refiner is None:
        control += c.n_refiner_layers * block_flops(image_tokens, dim)
    return base, control


def full_size_controlnet(device, dtype, seed=3):
    from diffusers import ZImageControlNetModel

    return _materialise(lambda: ZImageControlNetModel(**UNION_2_1), device, dtype, seed)


def timed(pipe, n: int, **call) -> tuple[list[float], object]:
    """common.timed_images with this benchmark's seeds (0, 1, ...), on a CUDA generator where CUDA is."""
    return timed_images(pipe, n, seed=0, device="cuda" if torch.cuda.is_available() else "cpu", **call)


def peak_gib(reset: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def ours_run(pipe, n: int, log: Log, name: str, **call) -> dict:
    timed(pipe, 2, **call)  # warm-up: compile (from the artefacts), capture the graphs
    pipe.telemetry.clear()
    peak_gib(reset=True)
    times, out = timed(pipe, n, **call)
    stats = pipe.stats()
    result = {"per_image_ms": summarize(times), "step_ms": stats["step_ms"], "denoise_ms": stats["denoise_ms"],
              "vae_encode_ms": stats["vae_encode_ms"], "steps": pipe.num_timesteps, "peak_gib": peak_gib()}
    log(f"{name:<34} image {result['per_image_ms']['mean']:8.1f} ms (cv {100 * result['per_image_ms']['cv']:.1f}%)  "
        f"step {result['step_ms']['mean']:7.2f} ms  x{result['steps']}  denoise {result['denoise_ms']['mean']:7.1f} ms  "
        f"encode {result['vae_encode_ms']['mean']:5.1f} ms  peak {result['peak_gib']:.1f} GiB")
    return result


def peer_step_ms(peer, device, side: int) -> dict:
    """diffusers' ControlNet + transformer forward for one step, on fixed inputs (CUDA events)."""
    latents = [torch.randn(16, 1, side // 8, side // 8, device=device, dtype=torch.bfloat16)]
    control = [torch.randn(33, 1, side // 8, side // 8, device=device, dtype=torch.bfloat16)]
    caption = [torch.randn(161, peer.transformer.config.cap_feat_dim, device=device, dtype=torch.bfloat16)]
    t = torch.tensor([0.5], device=device)

    def step():
        with torch.no_grad():
            samples = peer.controlnet(latents, t, caption, control, conditioning_scale=0.75)
            peer.transformer(latents, t, caption, controlnet_block_samples=samples, return_dict=False)

    return summarize(cuda_time_ms(step, warmup=2, iters=5))


def run(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "image_tasks.log")
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    side = 256 if args.tiny else 1024
    call = {"height": side, "width": side, "num_inference_steps": 8, "guidance_scale": 0.0}
    results = {"env": environment(), "args": vars(args)}
    log(str(results["env"]))

    parts = components(args.tiny, device, dtype)
    controlnet = (make_tiny_controlnet(seed=3, variant="control_noise_refiner", control_in_dim=33) if args.tiny
                  else full_size_controlnet(device, dtype))
    engine_dir = None
    if not args.tiny:
        start = time.perf_counter()
        build_engines(parts["transformer"], f"{side}x{side}", out_dir / "engines", backend="torch-compiled",
                      precision="bf16", caption_capacity=512, progress=False, vae=parts["vae"])
        results["build_s"] = time.perf_counter() - start
        engine_dir = out_dir / "engines"
        log(f"engine build {side}x{side} (denoiser, VAE decoder and encoder): {results['build_s']:.0f} s")

    base = ZImageTRTPipeline.from_components(**parts, engine_dir=engine_dir, device=device, torch_dtype=dtype)
    base.set_progress_bar_config(disable=True)
    text = ours_run(base, args.images, log, f"ours text to image {str(dtype).split('.')[-1]}", **call)
    results["ours_text_to_image"] = text

    img2img = ZImageTRTImg2ImgPipeline.from_pipe(base)
    photo = base.image_processor.postprocess(torch.rand(1, 3, side, side) * 2 - 1, output_type="pil")[0]
    image = ours_run(img2img, args.images, log, f"ours image to image, strength {STRENGTH}", image=photo,
                     strength=STRENGTH, **call)
    expected_steps = 8 - int(8 - 8 * STRENGTH)
    per_step_ratio = (image["denoise_ms"]["mean"] / image["steps"]) / (text["denoise_ms"]["mean"] / text["steps"])
    image["follows_steps"] = image["steps"] == expected_steps and abs(per_step_ratio - 1) <= 0.10
    log(f"  image to image ran {image['steps']} of 8 steps (expected {expected_steps}); denoising per step "
        f"{per_step_ratio:.3f}x text to image's: {'OK' if image['follows_steps'] else 'MISSED'}")
    results["ours_image_to_image"] = image

    caption_rows = -(-base.encode_prompt([PROMPT_160])[0].shape[0] // 32) * 32  # the prompt's rows, padded to 32
    image_tokens = (side // 16) ** 2
    base_flops, control_flops = step_flops(parts["transformer"].config, controlnet.config, image_tokens, caption_rows)
    f = control_flops / base_flops
    results["flops"] = {"transformer_tflop": base_flops / 1e12, "controlnet_tflop": control_flops / 1e12, "f": f}
    log(f"FLOPs per step: transformer {base_flops / 1e12:.2f} T, ControlNet {control_flops / 1e12:.2f} T: f = {f:.3f}")

    control = ZImageTRTControlNetPipeline.from_pipe(base, controlnet=controlnet)
    control_image = photo
    ours_cn = ours_run(control, args.images, log, f"ours ControlNet ({'tiny' if args.tiny else 'Union 2.1 size'})",
                       control_image=control_image,
                       **call)
    limit = (1 + f + 0.05) * text["step_ms"]["mean"]
    ours_cn["step_target_ms"] = limit
    ours_cn["step_target_met"] = ours_cn["step_ms"]["mean"] <= limit
    log(f"  ControlNet step {ours_cn['step_ms']['mean']:.2f} ms vs target (1 + f + 0.05) x {text['step_ms']['mean']:.2f}"
        f" = {limit:.2f} ms: {'OK' if ours_cn['step_target_met'] else 'MISSED'}")
    results["ours_controlnet"] = ours_cn

    if not args.skip_peers:
        from diffusers import ZImageControlNetPipeline

        peer = ZImageControlNetPipeline(controlnet=controlnet, **{k: parts[k] for k in (
            "scheduler", "vae", "text_encoder", "tokenizer", "transformer")})
        peer.set_progress_bar_config(disable=True)
        peer_call = {**call, "control_image": control_image, "output_type": "pil"}
        for name, compile_first in (("eager", False), ("compiled", True)):
            if compile_first:
                if args.tiny:
                    break  # (compiling on a CPU: not part of the smoke test)
                start = time.perf_counter()
                peer.transformer.compile_repeated_blocks(fullgraph=True)
                controlnet._repeated_blocks = ["ZImageControlTransformerBlock", "ZImageTransformerBlock"]
                controlnet.compile_repeated_blocks(fullgraph=True)
                timed(peer, 1, **peer_call)
                results["peer_compile_s"] = time.perf_counter() - start
            else:
                timed(peer, 1, **peer_call)
            peak_gib(reset=True)
            times, _ = timed(peer, args.peer_images, **peer_call)
            entry = {"per_image_ms": summarize(times), "peak_gib": peak_gib()}
            if device == "cuda":
                entry["step_ms"] = peer_step_ms(peer, device, side)
            results[f"diffusers_controlnet_{name}"] = entry
            log(f"diffusers ControlNet {name:<13} image {entry['per_image_ms']['mean']:8.1f} ms"
                + (f"  step {entry['step_ms']['mean']:7.2f} ms" if "step_ms" in entry else "")
                + f"  peak {entry['peak_gib']:.1f} GiB  -> ours {entry['per_image_ms']['mean'] / ours_cn['per_image_ms']['mean']:.2f}x faster")
        compiled = results.get("diffusers_controlnet_compiled")
        if compiled is not None:
            speedup = compiled["per_image_ms"]["mean"] / ours_cn["per_image_ms"]["mean"]
            results["image_speedup_vs_compiled"] = speedup
            log(f"  ours vs diffusers compiled ControlNet per image: {speedup:.2f}x (target >= 1.5x): "
                f"{'OK' if speedup >= 1.5 else 'MISSED'}")
    atomic_write_text(out_dir / "image_tasks.json", json.dumps(results, indent=2, default=str))
    log.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="image_tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="required: folder for image_tasks.json, image_tasks.log and the engine")
    ap.add_argument("--images", type=int, default=5, help="images timed per setting of ours (default: 5)")
    ap.add_argument("--peer-images", type=int, default=3, help="images timed per diffusers peer (default: 3)")
    ap.add_argument("--skip-peers", action="store_true", help="time ours only (default: off)")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny model and ControlNet on the CPU, eager engine: a smoke test (default: off)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
