"""Where a denoiser step's time goes: CUDA kernel totals for our compiled engine.

    python bench/profile_step.py [--variants base] [--precision fp16|bf16|fp8] [--attention auto|sdpa|fa3|fa3-fp8]

The denoiser is set up as a torch-compiled engine's build sets it up (the attention backend the build's
'auto' picks, its fused kernels; FP8 converts every block, as `--fp8-keep none`).

(A 'fused' variant with one GEMM for q|k|v and one for w1|w3 measured 104.1 ms against 103.8 ms on
the H100 on 2026-11-25: cuBLAS already runs these shapes near peak, so it was dropped.)
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine
from zimage_trt.benchmark.common import cuda_time_ms, format_row, full_size_transformer, graphed
from zimage_trt.runtime.telemetry import summarize
from zimage_trt.model.attention import BACKENDS as ATTENTION_BACKENDS, resolve_attention_backend
from zimage_trt.model.denoiser import StaticZImageDenoiser


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base")
    ap.add_argument("--caption", type=int, default=160)
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp8"])
    ap.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS,
                    help="attention backend (default: auto, the build's: FA3 where it runs, fa3-fp8 for fp8)")
    ap.add_argument("--no-fused-kernels", action="store_true", help="without the engines' fused kernels")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    model = full_size_transformer("cuda", dtype)
    x = torch.randn(1, 16, 128, 128, device="cuda")
    t = torch.tensor([0.5], device="cuda")
    padded = -(-args.caption // 32) * 32
    cap = torch.randn(1, padded, 2560, device="cuda", dtype=dtype)
    lens = torch.tensor([args.caption], device="cuda")
    reference = None
    attention = resolve_attention_backend(args.attention, torch.device("cuda"), precision=args.precision)
    print(f"attention {attention}, fused kernels {not args.no_fused_kernels}", flush=True)
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        den = StaticZImageDenoiser(model)
        if args.precision == "fp8":
            den.quantize_fp8()
        den.set_attention_backend(attention)
        den.set_fused_kernels(not args.no_fused_kernels)
        engine = CompiledDenoiserEngine(den)
        run = lambda: engine.run(x, t, cap, lens, masked=False)  # noqa: E731
        with torch.no_grad():
            out = run().clone()
            if reference is None:
                reference = out
            err = ((out - reference).norm() / reference.norm()).item()
            g = graphed(run)
            stats = summarize(cuda_time_ms(g.replay, iters=20))
            print(format_row(f"{variant} (graph)  rel diff to base {err:.1e}", stats), flush=True)
            if variant == args.variants.split(",")[0]:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
                print(table, flush=True)
        del g, engine, den


if __name__ == "__main__":
    main()
