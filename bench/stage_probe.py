"""Where the time and memory outside the denoiser go, full size, one GPU (random weights).

Text encoder (Qwen3-4B, 512 padded tokens as diffusers does): eager vs one CUDA graph replay.
VAE decoder at 1024x1024: eager, channels_last, torch.compile, both; postprocess to PIL on the CPU
(diffusers) vs on the GPU; each one's peak memory above what is resident. (The whole pipeline's
memory: bench/memory_probe.py.)

    python bench/stage_probe.py [--parts text,vae]
"""

import argparse
import time

import numpy as np
import torch

from zimage_trt.benchmark.common import PROMPT_160, cuda_time_ms, format_row, full_size_components
from zimage_trt.runtime.telemetry import summarize

from profile_step import graphed  # noqa: E402  (run from the repo root with bench/ on sys.path, or from bench/)

GIB = 2**30


def gib(x):
    return f"{x / GIB:.2f} GiB"


def peak_above(fn, base=None):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if base is None else base
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def text_encoder_probe(parts):
    te = parts["text_encoder"]
    tok = parts["tokenizer"]
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT_160}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    t = tok([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    ids, mask = t.input_ids.cuda(), t.attention_mask.cuda().bool()
    print("prompt tokens", int(mask.sum()), flush=True)

    def eager():
        return te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    with torch.no_grad():
        ref, peak = peak_above(eager)
        print(f"text encoder eager 512: peak above resident {gib(peak)}", flush=True)
        print(format_row("text encoder eager, 512 tokens", summarize(cuda_time_ms(eager, iters=20))), flush=True)
        try:
            g = graphed(eager)
            static_out = g.output
            g.replay()
            torch.cuda.synchronize()
            same = torch.equal(static_out, ref)
            diff = (static_out.float() - ref.float()).abs().max().item()
            print(f"text encoder graph: bitwise equal to eager {same}, max diff {diff}", flush=True)
            print(format_row("text encoder CUDA graph, 512 tokens", summarize(cuda_time_ms(g.replay, iters=20))), flush=True)
        except Exception as e:  # report and go on: this is a probe
            print("text encoder graph capture FAILED:", type(e).__name__, str(e)[:500], flush=True)


def vae_probe(parts):
    vae = parts["vae"]
    lat = torch.randn(1, 16, 128, 128, device="cuda", dtype=vae.dtype)

    def dec():
        return vae.decode(lat, return_dict=False)[0]

    with torch.no_grad():
        ref, peak = peak_above(dec)
        print(f"vae eager: peak above resident {gib(peak)}", flush=True)
        print(format_row("vae decode eager", summarize(cuda_time_ms(dec))), flush=True)
        for compiled, layout in ((False, torch.channels_last), (True, torch.contiguous_format), (True, torch.channels_last)):
            name = f"vae decode {'compiled' if compiled else 'eager'}{' channels_last' if layout is torch.channels_last else ''}"
            vae.to(memory_format=layout)
            if compiled:
                torch._dynamo.reset()
                vae.decoder.compile(fullgraph=False, dynamic=False)
                start = time.perf_counter()
                dec()
                torch.cuda.synchronize()
                print(f"{name}: first call (compile) {time.perf_counter() - start:.1f}s", flush=True)
            out, peak = peak_above(dec)
            print(f"{name}: peak {gib(peak)}, max diff {(out.float() - ref.float()).abs().max().item():.3g}", flush=True)
            print(format_row(name, summarize(cuda_time_ms(dec))), flush=True)
        vae.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()

        # Postprocess: diffusers' (GPU denormalise, then CPU numpy *255, round, uint8, PIL) vs all on GPU.
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        proc = VaeImageProcessor(vae_scale_factor=16)

        def cpu_pil():
            return proc.postprocess(ref, output_type="pil")

        def gpu_pil():
            x = (ref / 2 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
            arr = x.permute(0, 2, 3, 1).cpu().numpy()
            return [Image.fromarray(a) for a in arr]

        for name, fn in (("postprocess diffusers (CPU)", cpu_pil), ("postprocess on GPU", gpu_pil)):
            times = []
            for _ in range(12):
                s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - s) * 1e3)
            print(format_row(name, summarize(times[2:])), flush=True)
        a = np.asarray(cpu_pil()[0])
        b = np.asarray(gpu_pil()[0])
        print("postprocess GPU == diffusers bitwise:", bool((a == b).all()), "max diff", int(np.abs(a.astype(int) - b).max()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--parts", default="text,vae")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    parts = full_size_components("cuda", dtype)
    torch.cuda.synchronize()
    print(f"components resident: {gib(torch.cuda.memory_allocated())}", flush=True)
    for name, module in (("transformer", parts["transformer"]), ("text_encoder", parts["text_encoder"]), ("vae", parts["vae"])):
        print(f"  {name}: {gib(sum(p.numel() * p.element_size() for p in module.parameters()))}", flush=True)
    todo = args.parts.split(",")
    if "text" in todo:
        text_encoder_probe(parts)
    if "vae" in todo:
        vae_probe(parts)


if __name__ == "__main__":
    main()
