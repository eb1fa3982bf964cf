"""FP8 matrix-product variants for one Z-Image layer's shapes (4256 tokens), on one GPU.

Which `torch._scaled_mm` form is fastest: row-wise scales (per token x per output row, what the fp8
engine uses), one scale per tensor, each with and without fast accumulation; bf16 as the reference.
Also the cost of quantising the activations per token (amax + divide + cast), the part a fused
kernel would hide.

    python bench/fp8_gemm.py
"""

import torch

from zimage_trt.benchmark.common import cuda_time_ms
from zimage_trt.runtime.telemetry import summarize

SHAPES = [(3840, 11520), (3840, 3840), (3840, 20480), (10240, 3840)]  # qkv, out, w1|w3, w2
M = 4256
F8 = torch.float8_e4m3fn


def main():
    torch.manual_seed(0)
    xs = {k: torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in SHAPES}}
    ws = [(k, n, torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for k, n in SHAPES]
    flops = sum(2 * M * k * n for k, n in SHAPES)

    def q_rows(x):
        s = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        return (x.float() / s).to(F8), s

    variants = {}
    variants["bf16"] = lambda: [xs[k] @ w.t() for k, n, w in ws]
    qw_row = [(k, (w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).to(F8),
               (w.float().abs().amax(1, keepdim=True) / 448).t().contiguous()) for k, n, w in ws]
    qx_row = {k: q_rows(x) for k, x in xs.items()}
    one = torch.ones((), device="cuda")
    qx_t = {k: (x.float() / (x.abs().amax().float() / 448)).to(F8) for k, x in xs.items()}
    qw_t = [(k, (w.float() / (w.abs().amax().float() / 448)).to(F8)) for k, n, w in ws]

    def rowwise(fast):
        return lambda: [torch._scaled_mm(qx_row[k][0], wq.t(), scale_a=qx_row[k][1], scale_b=sw,
                                         out_dtype=torch.bfloat16, use_fast_accum=fast) for k, wq, sw in qw_row]

    def tensorwise(fast):
        return lambda: [torch._scaled_mm(qx_t[k], wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                         use_fast_accum=fast) for k, wq in qw_t]

    variants["fp8 rowwise"] = rowwise(False)
    variants["fp8 rowwise fast-accum"] = rowwise(True)
    variants["fp8 tensorwise"] = tensorwise(False)
    variants["fp8 tensorwise fast-accum"] = tensorwise(True)
    variants["quantise activations per token (4 inputs)"] = lambda: [q_rows(xs[k]) for k, _, _ in ws]
    variants["quantise compiled"] = (lambda f: lambda: [f(xs[k]) for k, _, _ in ws])(torch.compile(q_rows))
    ref = [xs[k] @ w.t() for k, n, w in ws]
    for name, fn in variants.items():
        try:
            out = fn()
            stats = summarize(cuda_time_ms(fn, iters=30))
            extra = ""
            if not name.startswith("quant"):
                err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref))
                extra = f"  {flops / stats['mean'] / 1e9:7.0f} TFLOP/s  rel err {err:.2e}"
            print(f"{name:<44} {stats['mean']:7.3f} ms a layer (cv {100 * stats['cv']:.1f}%){extra}", flush=True)
        except Exception as e:
            print(f"{name:<44} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
