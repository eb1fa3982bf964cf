"""Which row-wise scaled FP8 products (`torch._scaled_mm`, e4m3, one scale per row and per column, bf16
out, fast accumulation) this GPU's cuBLASLt runs, by rows x in -> out, with and without a bias: the shapes
`Fp8Linear` meets (the engines' padded token counts, the text encoder's real ones, the tests' small ones).
A refused shape runs dequantised in fp32 in `Fp8Linear` (model/fp8.py); this says which ones those are.

    python bench/scaled_mm_shapes.py [--json OUT.json]
"""

import argparse
import json

import torch

ROWS = (3, 16, 32, 64, 77, 80, 96, 128, 160, 256, 4256)
IN_OUT = ((2560, 64), (9728, 64), (192, 64), (2560, 9728), (9728, 2560), (2560, 2560), (3840, 10240), (10240, 3840))


def runs(m: int, k: int, n: int, bias: bool) -> str:
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(m, 1, device="cuda"), scale_b=torch.ones(1, n, device="cuda"),
                         bias=torch.zeros(n, device="cuda", dtype=torch.bfloat16) if bias else None,
                         out_dtype=torch.bfloat16, use_fast_accum=True)
        torch.cuda.synchronize()
        return "ok"
    except RuntimeError as error:
        return "refused" if "NOT_SUPPORTED" in str(error) else f"error: {str(error)[:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="also write the table here (default: print only)")
    args = ap.parse_args()
    table = []
    for k, n in IN_OUT:
        for bias in (False, True):
            row = {"in": k, "out": n, "bias": bias, "rows": {m: runs(m, k, n, bias) for m in ROWS}}
            table.append(row)
            refused = [m for m, r in row["rows"].items() if r != "ok"]
            print(f"{k:>6} -> {n:<6} bias {bias!s:<5} not run for rows: {refused or 'none'}"
                  + "".join(f"  [{m}: {r}]" for m, r in row["rows"].items() if r.startswith("error")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
