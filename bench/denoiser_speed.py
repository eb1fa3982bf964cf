"""Denoiser step on the GPU: diffusers eager, diffusers compile_repeated_blocks, our engine.

Full-size Z-Image-Turbo transformer, random weights, 1024x1024, a 160-token caption, batch 1.
    python bench/denoiser_speed.py --out engines/bench [--json results.json]
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from zimage_trt import build_engines, open_denoiser
from zimage_trt.benchmark.common import cuda_time_ms, environment, format_row, full_size_transformer
from zimage_trt.model.shapes import Resolution
from zimage_trt.runtime.telemetry import summarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engines/bench")
    ap.add_argument("--resolution", default="1024x1024", help="WIDTHxHEIGHT")
    ap.add_argument("--caption", type=int, default=160)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-peer-compile", action="store_true")
    args = ap.parse_args()
    h, w = Resolution.parse(args.resolution).height, Resolution.parse(args.resolution).width
    results = {"env": environment(), "args": vars(args)}
    print(results["env"], flush=True)

    transformer = full_size_transformer("cuda", torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, h // 8, w // 8, device="cuda", generator=gen)
    caption = torch.randn(args.caption, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda")

    def diffusers_forward():
        return transformer([latents[0].to(torch.bfloat16).unsqueeze(1)], t, [caption], return_dict=False)[0][0]

    with torch.no_grad():
        reference = diffusers_forward().float().squeeze(1)
        eager = summarize(cuda_time_ms(diffusers_forward, iters=args.iters))
    results["diffusers_eager_ms"] = eager
    print(format_row("diffusers eager bf16", eager), flush=True)

    start = time.perf_counter()
    built = build_engines(transformer, [args.resolution], args.out, backend="torch-compiled",
                          precision=args.precision, caption_capacity=512, progress=False)
    results["build_seconds"] = time.perf_counter() - start
    results["engine_bytes"] = built.manifest.files[0].bytes
    results["fp16_downscale_log2"] = built.manifest.fp16_downscale_log2
    print(f"built {built.manifest_path} in {results['build_seconds']:.1f}s", flush=True)

    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    ours_model = full_size_transformer("cuda", dtype)  # same seed -> same weights, in our precision
    engine = open_denoiser(ours_model, args.out, "cuda", dtype, args.resolution, 1)
    cap = caption.to(dtype)[None]
    lens = torch.tensor([args.caption], device="cuda")
    padded = -(-args.caption // 32) * 32
    cap_padded = torch.zeros(1, padded, 2560, device="cuda", dtype=dtype)
    cap_padded[:, : args.caption] = cap
    with torch.no_grad():
        ours = engine.run(latents, t, cap_padded, lens, masked=False)
        err = ((ours - reference).norm() / reference.norm()).item()
        results["rel_l2_vs_diffusers_bf16"] = err
        print(f"our {args.precision} engine vs diffusers bf16: relative L2 {err:.2e}", flush=True)
        step = summarize(cuda_time_ms(lambda: engine.run(latents, t, cap_padded, lens, masked=False), iters=args.iters))
        results["ours_ms"] = step
        print(format_row(f"ours {engine.kind} {args.precision}", step, eager["mean"]), flush=True)
        # The same inside one CUDA graph, as the runtime replays it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            engine.run(latents, t, cap_padded, lens, masked=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = engine.run(latents, t, cap_padded, lens, masked=False)
        graphed = summarize(cuda_time_ms(graph.replay, iters=args.iters))
        results["ours_graph_ms"] = graphed
        print(format_row(f"ours {engine.kind} {args.precision} + CUDA graph", graphed, eager["mean"]), flush=True)
        masked = summarize(cuda_time_ms(lambda: engine.run(latents, t, torch.nn.functional.pad(cap_padded, (0, 0, 0, 512 - padded)), lens, masked=True), iters=5))
        results["ours_masked_capacity512_ms"] = masked
        print(format_row("ours, caption padded to 512 + key mask", masked, eager["mean"]), flush=True)
    del ours_model, engine, graph, static_out

    # Cold start in a fresh process: engine files -> first output.
    cmd = [sys.executable, "-c", (
        "import time; t0=time.perf_counter(); import torch; from zimage_trt import open_denoiser;"
        "from zimage_trt.benchmark.common import full_size_transformer;"
        f"m=full_size_transformer('cuda', torch.{str(dtype).split('.')[-1]}); t1=time.perf_counter();"
        f"e=open_denoiser(m, '{args.out}', 'cuda', m.dtype, '{args.resolution}', 1);"
        f"x=torch.randn(1,16,{h // 8},{w // 8},device='cuda'); c=torch.randn(1,{padded},2560,device='cuda',dtype=m.dtype);"
        f"l=torch.tensor([{args.caption}],device='cuda'); tt=torch.tensor([0.5],device='cuda');"
        "e.run(x,tt,c,l,masked=False); torch.cuda.synchronize(); t2=time.perf_counter();"
        "print('COLD', t1-t0, t2-t1)")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("COLD")]
    if line:
        _, weights_s, first_s = line[0].split()
        results["cold_start"] = {"weights_s": float(weights_s), "engine_to_first_output_s": float(first_s)}
        print(f"cold start (fresh process): weights {float(weights_s):.1f}s, engine files -> first output {float(first_s):.1f}s", flush=True)
    else:
        print("cold start failed:", out.stderr[-3000:], flush=True)

    if not args.skip_peer_compile:
        start = time.perf_counter()
        transformer.compile_repeated_blocks(fullgraph=True)
        with torch.no_grad():
            diffusers_forward()
        results["peer_compile_seconds"] = time.perf_counter() - start
        with torch.no_grad():
            peer = summarize(cuda_time_ms(diffusers_forward, iters=args.iters))
        results["diffusers_compiled_ms"] = peer
        print(format_row("diffusers compile_repeated_blocks bf16", peer, eager["mean"]), flush=True)
        print(f"ours (graph) vs compiled peer: {peer['mean'] / results['ours_graph_ms']['mean']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
