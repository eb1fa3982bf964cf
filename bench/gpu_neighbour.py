"""A neighbour on the GPU for bench/shared_gpu.py: another process that computes beside the service.

    python bench/gpu_neighbour.py matmul   # 8192x8192 bf16 matrix products back to back
    python bench/gpu_neighbour.py copy     # a 1 GiB buffer copied into another, back to back
    python bench/gpu_neighbour.py idle     # no GPU work (the CPU smoke run)

Prints `CONTEXT t` once its CUDA context exists and `WORK t` once its first kernel finished
(time.monotonic(): one clock for every process of the machine), then works until stopped or
`--seconds` pass. Only torch is imported, so it starts as fast as a neighbour can.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("matmul", "copy", "idle"), help="what it does on the GPU")
    ap.add_argument("--seconds", type=float, default=150.0, help="stop after this long at the latest (default: 150)")
    args = ap.parse_args(argv)
    if args.kind == "idle":
        print(f"CONTEXT {time.monotonic()}", flush=True)
        print(f"WORK {time.monotonic()}", flush=True)
        time.sleep(args.seconds)
        return 0
    import torch

    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    print(f"CONTEXT {time.monotonic()}", flush=True)
    if args.kind == "matmul":
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)

        def step():
            torch.matmul(a, b, out=c)
    else:
        src = torch.ones(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)

        def step():
            dst.copy_(src)
    step()
    torch.cuda.synchronize()
    print(f"WORK {time.monotonic()}", flush=True)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for _ in range(20):
            step()
        torch.cuda.synchronize()  # a bounded queue of work: it stops soon after it is told to
    return 0


if __name__ == "__main__":
    sys.exit(main())
