"""`zimage-trt compare` on the full-size model with random weights (no checkpoint can be downloaded here):
the contact sheet and PSNR / SSIM table of two settings, by default diffusers' eager bf16 pipeline against
our FP8 pipeline. Random weights draw noise, not pictures: the sheet shows where and how much the second
setting moves the pixels, and the table is the figure to read.

    PYTHONPATH=src:/tmp/site python bench/compare_sheet.py --out docs/compare-h200 [compare's options]
    PYTHONPATH=src python bench/compare_sheet.py --tiny-weights --device cpu --size 64x64 --out /tmp/cs   # plumbing
"""

import argparse
import sys

from zimage_trt import compare
from zimage_trt.benchmark.common import bench_components


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-weights", action="store_true", help="the tiny model instead of the full-size one (a CPU test)")
    compare.add_arguments(ap)
    ap.set_defaults(a_pipeline="diffusers", b_pipeline="ours", b_precision="fp8")
    args = ap.parse_args(argv)
    device = args.device or "cuda"
    return compare.run(args, components=lambda dtype: bench_components(args.tiny_weights, device, dtype))


if __name__ == "__main__":
    sys.exit(main())
