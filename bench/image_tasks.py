"""The image tasks on the H200: `python bench/image_tasks.py --out DIR` (see zimage_trt/benchmark/image_tasks.py)."""

import sys

from zimage_trt.benchmark.image_tasks import main

if __name__ == "__main__":
    sys.exit(main())
