"""Full-width Z-Image denoiser -> fp16 ONNX -> TensorRT-RTX engine (compute capability 8.9), on a CPU.

The real architecture at full width (dim 3840, 30 heads, caption features 2560, two noise and two
context refiner blocks), with only the number of main layers reduced, so that export and build fit a
small machine. Random weights (the size and the graph do not depend on the values). Each phase runs
in its own spawned process, so its peak RSS (ru_maxrss) is its own:

    python bench/rtx_fullwidth_build.py --layers 2
    python bench/rtx_fullwidth_build.py --layers 4
    python bench/rtx_fullwidth_build.py --layers 2 --resolution 1024x1024,1344x768 --reuse-onnx

Every run appends its measurements to OUT/results.json; the table printed at the end holds all of
them, and where two depths were measured with the same profiles, the per-layer increments and the
extrapolation to the full model (30 main layers + 2 noise + 2 context refiners).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import sys
import time
import traceback
from pathlib import Path

FULL_LAYERS = 30
CAP_DIM = 2560


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _dir_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


# -- phase 1: model + export ---------------------------------------------------------------------
def _make_transformer(layers: int):
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage_trt.benchmark.common import random_init_

    with torch.device("meta"):
        model = ZImageTransformer2DModel(n_layers=layers, n_refiner_layers=2)
    # Materialised directly in fp16: the same values as an fp32 init followed by .half(), without the
    # 4-bytes-per-parameter transient (which would dominate this phase's peak RSS).
    model = torch.nn.Module.to(model, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    random_init_(model, seed=0)
    model = torch.nn.Module.half(model)
    return model.eval().requires_grad_(False)


def _onnx_summary(onnx_path: Path) -> dict:
    import onnx
    from collections import Counter

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    init_types = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer)
    init_elems: Counter = Counter()
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        init_elems[onnx.TensorProto.DataType.Name(t.data_type)] += n
    ops = Counter(node.op_type for node in graph.node)
    # Casts to float32 in the graph show where the export keeps fp32 maths (norm statistics, RoPE, ...).
    cast_to = Counter()
    for node in graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    cast_to[onnx.TensorProto.DataType.Name(a.i)] += 1
    return {
        "nodes": len(graph.node),
        "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
        "op_types": dict(ops.most_common()),
        "initializers_by_dtype": dict(init_types),
        "initializer_elements_by_dtype": dict(init_elems),
        "casts_to": dict(cast_to),
        "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input},
        "outputs": {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in graph.output},
    }


def export_phase(layers: int, onnx_path: str, max_latent_side: int, max_capacity: int, external_data) -> dict:
    import torch

    from zimage_trt.model.denoiser import StaticZImageDenoiser
    from zimage_trt.compiler.export import export_denoiser

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    transformer = _make_transformer(layers)
    cfg = transformer.config
    params = sum(p.numel() for p in transformer.parameters())
    per_layer = sum(p.numel() for p in transformer.layers[0].parameters())
    noise_ref = sum(p.numel() for b in transformer.noise_refiner for p in b.parameters())
    context_ref = sum(p.numel() for b in transformer.context_refiner for p in b.parameters())
    make_seconds = time.perf_counter() - t0
    rss_after_model = _peak_rss_bytes()

    denoiser = StaticZImageDenoiser(transformer)
    used = sum(p.numel() for p in denoiser.parameters())  # the basic-mode graph's weights
    onnx_path = Path(onnx_path)
    info = export_denoiser(denoiser, onnx_path, max_batch=16, max_capacity=max_capacity,
                           max_latent_side=max_latent_side, verify=False, external_data=external_data)
    files = sorted(onnx_path.parent.glob(onnx_path.name + "*"))
    return {
        "layers": layers,
        "config": {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
                   "n_refiner_layers": cfg.n_refiner_layers, "cap_feat_dim": cfg.cap_feat_dim},
        "params": params,
        "params_in_graph": used,
        "params_per_main_layer": per_layer,
        "params_noise_refiners": noise_ref,
        "params_context_refiners": context_ref,
        "model_seconds": make_seconds,
        "export_seconds": info["seconds"],
        "onnx_bytes": info["bytes"],
        "onnx_files": {p.name: p.stat().st_size for p in files},
        "external_data": info["external_data"],
        "onnx": _onnx_summary(onnx_path),
        "rss_after_model": rss_after_model,
        "export_peak_rss": _peak_rss_bytes(),
    }


# -- phase 2: engine build -----------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def build_phase(onnx_path: str, engine_path: str, profiles: list, compute_capability: str) -> dict:
    from zimage_trt.engines.tensorrt.runtime import build_tensorrt_engine

    handler = _Collect()
    log = logging.getLogger("zimage_trt.engines.tensorrt.runtime")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # TensorRT warnings and errors, forwarded by the library's logger
    info = build_tensorrt_engine(onnx_path, engine_path, profiles, flavor="tensorrt-rtx",
                                 compute_capabilities=[compute_capability], progress=False)
    return {
        "library": f"{info['library']} {info['version']}",
        "build_seconds": info["build_seconds"],
        "engine_bytes": info["engine_bytes"],
        "compute_capabilities": info["compute_capabilities"],
        "strongly_typed": info["strongly_typed"],
        "inputs": info["inputs"],
        "outputs": info["outputs"],
        "profiles": info["profiles"],
        "trt_messages": handler.records,
        "build_peak_rss": _peak_rss_bytes(),
    }


# -- process plumbing ----------------------------------------------------------------------------
def _child(queue, fn, args):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", _peak_rss_bytes()))


def run_in_child(fn, *args) -> dict:
    """Run fn in a fresh spawned interpreter; returns its result, or raises with its exact error."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    start = time.perf_counter()
    proc.start()
    message = None
    while message is None:
        try:
            message = queue.get(timeout=5)
        except Exception:  # queue.Empty: is the child still alive?
            if not proc.is_alive():
                break
    proc.join()
    wall = time.perf_counter() - start
    if message is None:
        raise RuntimeError(f"{fn.__name__} died with exit code {proc.exitcode} after {wall:.0f}s "
                           f"(-9 is SIGKILL, usually the kernel's out-of-memory killer)")
    if message[0] == "error":
        raise RuntimeError(f"{fn.__name__} failed after {wall:.0f}s (peak RSS {message[2] / 2**30:.2f} GiB):\n{message[1]}")
    result = message[1]
    result[f"{fn.__name__}_wall_seconds"] = wall
    return result


# -- reporting -----------------------------------------------------------------------------------
def _gib(n) -> str:
    return f"{n / 2**30:7.2f}"


def print_table(records: list[dict]) -> None:
    print("\nlayers  params(M)  export s  ONNX GiB   build s  engine GiB  export RSS  build RSS  profiles")
    for r in sorted(records, key=lambda r: (len(r["resolutions"]), r["layers"])):
        export_s = f"{r['export_seconds']:8.1f}" if r.get("export_seconds") is not None else "   (reused)"
        print(f"{r['layers']:6d}  {r['params'] / 1e6:9.1f}  {export_s}  {_gib(r['onnx_bytes'])}  "
              f"{r['build_seconds']:8.1f}  {_gib(r['engine_bytes'])}     {_gib(r['export_peak_rss']) if r.get('export_peak_rss') else '      -'}"
              f"    {_gib(r['build_peak_rss'])}  {'+'.join(r['resolutions'])}")


def print_extrapolation(records: list[dict]) -> None:
    """Least-squares line over main-layer count per quantity (runs with the same profiles), its slope
    (the per-layer increment), the worst residual, and the value at the full depth."""
    keys = ["params", "export_seconds", "onnx_bytes", "build_seconds", "engine_bytes", "export_peak_rss", "build_peak_rss"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r["resolutions"]), []).append(r)
    for resolutions, group in groups.items():
        if len({r["layers"] for r in group}) < 2:
            continue
        print(f"\nper main layer ({'+'.join(resolutions)}; layers {sorted(r['layers'] for r in group)}) and "
              f"extrapolation to {FULL_LAYERS} layers + 2 noise + 2 context refiners:")
        for key in keys:
            points = [(r["layers"], r[key]) for r in group if r.get(key) is not None]
            if len({x for x, _ in points}) < 2:
                continue
            n = len(points)
            mx = sum(x for x, _ in points) / n
            my = sum(y for _, y in points) / n
            step = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
            base = my - step * mx
            resid = max(abs(y - (base + step * x)) for x, y in points)
            full = base + step * FULL_LAYERS
            if key.endswith("seconds"):
                print(f"  {key:<16} {step:12.2f} s/layer   (worst residual {resid:6.1f} s)   -> {full:10.1f} s")
            elif key == "params":
                print(f"  {key:<16} {step / 1e6:12.2f} M/layer   (exact per-layer count "
                      f"{group[0]['params_per_main_layer'] / 1e6:.2f} M) -> {full / 1e9:10.3f} B")
            else:
                print(f"  {key:<16} {step / 2**20:12.1f} MiB/layer (worst residual {resid / 2**20:6.1f} MiB) "
                      f"-> {full / 2**30:10.2f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2], help="main-layer counts to measure (refiners stay 2+2)")
    ap.add_argument("--resolution", default="1024x1024",
                    help="WIDTHxHEIGHT; a comma-separated list builds one profile per resolution in one engine")
    ap.add_argument("--caption", type=int, default=512, help="caption capacity of every profile")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cc", default="8.9", help="TensorRT-RTX target compute capability")
    ap.add_argument("--out", default="/tmp/rtx_fullwidth")
    ap.add_argument("--reuse-onnx", action="store_true", help="skip the export when OUT/L<n>/denoiser.onnx exists")
    ap.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                    help="auto: the library's rule (external past 1.8 GB of weights)")
    ap.add_argument("--keep-engine", action="store_true", help="keep the engine file (deleted by default: disk)")
    args = ap.parse_args()

    from zimage_trt.model.shapes import Resolution, check_caption_capacity

    check_caption_capacity(args.caption)
    resolutions = [Resolution.parse(r) for r in args.resolution.split(",")]
    profiles = [{
        "latents": r.latent_shape(args.batch),
        "timestep": (args.batch,),
        "cap_feats": (args.batch, args.caption, CAP_DIM),
        "cap_lens": (args.batch,),
    } for r in resolutions]
    max_side = max(256, *(max(r.latent_hw) for r in resolutions))
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    records = json.loads(results_path.read_text()) if results_path.exists() else []

    for layers in args.layers:
        layer_dir = out / f"L{layers}"
        onnx_path = layer_dir / "denoiser.onnx"
        meta_path = layer_dir / "export.json"
        print(f"== {layers} main layers, profiles {[r.key for r in resolutions]}, caption {args.caption}, "
              f"batch {args.batch}, sm {args.cc}", flush=True)
        if args.reuse_onnx and onnx_path.exists() and meta_path.exists():
            export = json.loads(meta_path.read_text())
            export["export_seconds"] = export["export_peak_rss"] = None  # not measured in this run
            print(f"   reusing {onnx_path}", flush=True)
        else:
            export = run_in_child(export_phase, layers, str(onnx_path), max_side, max(512, args.caption), external)
            meta_path.write_text(json.dumps(export, indent=1))
            print(f"   params {export['params']:,} (graph uses {export['params_in_graph']:,}; "
                  f"{export['params_per_main_layer']:,} per main layer)", flush=True)
            print(f"   export {export['export_seconds']:.1f}s, ONNX {export['onnx_bytes']:,} bytes "
                  f"{export['onnx_files']}, peak RSS {export['export_peak_rss'] / 2**30:.2f} GiB "
                  f"(after model {export['rss_after_model'] / 2**30:.2f} GiB)", flush=True)
            summary = export["onnx"]
            print(f"   ONNX {summary['nodes']} nodes, {summary['opset']}, initializers "
                  f"{summary['initializers_by_dtype']}, casts {summary['casts_to']}", flush=True)
            print(f"   ops {summary['op_types']}", flush=True)
        engine_path = layer_dir / f"denoiser-{len(profiles)}p.plan"
        built = run_in_child(build_phase, str(onnx_path), str(engine_path), profiles, args.cc)
        if not args.keep_engine:
            engine_path.unlink(missing_ok=True)
        print(f"   {built['library']}: build {built['build_seconds']:.1f}s, engine {built['engine_bytes']:,} bytes, "
              f"peak RSS {built['build_peak_rss'] / 2**30:.2f} GiB, targets {built['compute_capabilities']}, "
              f"strongly typed {built['strongly_typed']}", flush=True)
        print(f"   inputs {built['inputs']} outputs {built['outputs']}", flush=True)
        for level, msg in built["trt_messages"]:
            print(f"   [{level}] {msg}", flush=True)

        record = {
            "layers": layers,
            "resolutions": [r.key for r in resolutions],
            "caption": args.caption,
            "batch": args.batch,
            "cc": args.cc,
            **{k: export.get(k) for k in ("params", "params_per_main_layer", "export_seconds", "onnx_bytes",
                                           "export_peak_rss")},
            **{k: built[k] for k in ("library", "build_seconds", "engine_bytes", "build_peak_rss")},
            "trt_warnings": len(built["trt_messages"]),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        records = [r for r in records if (r["layers"], r["resolutions"]) != (layers, record["resolutions"])]
        records.append(record)
        results_path.write_text(json.dumps(records, indent=1))

    print_table(records)
    print_extrapolation(records)
    print(f"\nall runs: {results_path}")


if __name__ == "__main__":
    sys.exit(main())
