#!/usr/bin/env python3
"""Engine-build script: Z-Image-Turbo's denoiser -> ONNX -> fixed-shape engines + a JSON manifest.

    python build/build_engines.py --model DIR --resolution 1024x1024 --engine-dir engines/

A thin wrapper over `zimage_trt.build_engines` (the same as `zimage-trt build`); --help lists options.
"""

import sys
from pathlib import Path

try:
    import zimage_trt  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zimage_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
