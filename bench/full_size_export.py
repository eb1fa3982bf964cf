"""Full-size Z-Image denoiser -> fp16 ONNX on this machine (CPU is fine; ~12 GB RAM), then a
TensorRT-RTX parse of the result when tensorrt_rtx is installed: time, size on disk, peak RSS.

    python bench/full_size_export.py --out /tmp/fullexport
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/fullexport")
    args = ap.parse_args()
    from diffusers import ZImageTransformer2DModel

    from zimage_trt.benchmark.common import random_init_
    from zimage_trt.model.denoiser import StaticZImageDenoiser
    from zimage_trt.compiler.export import export_denoiser

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()  # the full-size default config
    transformer = torch.nn.Module.to(transformer.to_empty(device="cpu"), torch.float16)
    random_init_(transformer).eval().requires_grad_(False)
    info = export_denoiser(StaticZImageDenoiser(transformer), out / "denoiser-fp16.onnx", verify=False)
    info["params"] = sum(p.numel() for p in transformer.parameters())
    info["export_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del transformer
    try:
        import tensorrt_rtx as trt
    except ImportError:
        trt = None
    if trt is not None:
        start = time.perf_counter()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        info["tensorrt_rtx_parsed"] = bool(parser.parse_from_file(info["path"]))
        info["tensorrt_rtx_layers"] = network.num_layers
        info["tensorrt_rtx_errors"] = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        info["parse_seconds"] = time.perf_counter() - start
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
