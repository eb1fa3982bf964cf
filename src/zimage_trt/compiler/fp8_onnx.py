"""FP8 (e4m3) Q/DQ for TensorRT's explicit-quantisation path, written straight into our exported ONNX.

TensorRT (and TensorRT-RTX) build FP8 GEMMs from ONNX ``QuantizeLinear``/``DequantizeLinear`` pairs
(opset >= 19, ``FLOAT8E4M3FN``); a strongly typed network takes its precision from them, not from a
builder flag. :func:`quantize_onnx_fp8` adds them around the transformer blocks' projections -- the
seven layers per block that the torch-compiled FP8 path converts (``to_q/k/v``, ``to_out.0``,
``w1/w2/w3``) -- and leaves attention, norms, modulation, the embedders and the final layer in the
graph's own dtype:

* weight: stored as a float8e4m3 initializer (half the bytes of fp16), one scale per output channel
  (``DequantizeLinear`` with ``axis``: 1 for a MatMul's ``[K, N]``, 0 for a ``transB`` Gemm's ``[N, K]``);
* activation: ``QuantizeLinear -> DequantizeLinear`` with one static per-tensor scale, the largest
  ``|x|`` seen over ``calibration_inputs`` (run through onnxruntime on the CPU) divided by 448. Layers
  reading the same tensor (q, k, v) share one pair.

GEMMs whose K or N is not a multiple of 16 stay 16-bit (FP8 tensor cores want multiples of 16; the
real model's are, the tiny test model's FFN width 170 is not). Needs only onnx (its ``ml_dtypes``
dependency rounds to e4m3) and onnxruntime. Engines built from the result need FP8 hardware: TensorRT-RTX
refuses compute capability 8.6 and below ("model contains HW-specific datatypes: fp8_e4m3") and builds
8.9 (Ada) and 12.0 (Blackwell). Static per-tensor activation scales are what TensorRT's FP8 GEMMs take;
the torch path scales each token on the fly, so the two differ slightly in accuracy.
"""

from __future__ import annotations

import ast
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

FP8_MAX = 448.0  # largest finite float8 e4m3fn
# The torch-compiled FP8 path's layers (denoiser.quantize_block_fp8), as the exporter scopes them.
PROJECTIONS = r"\.block\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])$"
MIN_DIM = 16  # FP8 tensor-core GEMMs want K and N in multiples of 16


def _module_scope(node) -> str | None:
    """The torch module a node came from (its innermost module scope), from the exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 else None  # the last entry is the op itself
    return None


def _weight_layout(node, weight) -> int | None:
    """Output-channel axis of a 2-D weight feeding ``node`` as its second input, else None."""
    if len(weight.dims) != 2:
        return None
    if node.op_type == "MatMul":
        return 1  # x[.., K] @ W[K, N]
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return 0 if attrs.get("transB", 0) else 1
    return None


def select_fp8_nodes(model, *, modules: str | None = PROJECTIONS, min_dim: int = MIN_DIM) -> list:
    """MatMul/Gemm nodes whose second input is a 2-D float weight initializer with K and N multiples
    of ``min_dim``; with ``modules`` (a regex, searched in the torch module name the exporter recorded
    in ``pkg.torch.onnx.name_scopes``) only those layers. ``modules=None``: every such GEMM."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    pattern = re.compile(modules) if modules else None
    chosen = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        axis = _weight_layout(node, weight)
        if axis is None or weight.data_type not in floats:
            continue
        if any(d % min_dim for d in weight.dims):
            continue
        if pattern is not None and not pattern.search(_module_scope(node) or ""):
            continue
        chosen.append(node)
    return chosen


def _calibrate_amax(model, tensor_names: list[str], calibration_inputs: Iterable[Mapping[str, np.ndarray]],
                    work_dir: Path) -> dict[str, float]:
    """Largest |value| of each named intermediate tensor over the calibration inputs (onnxruntime, CPU)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in list(probe.graph.value_info) + list(probe.graph.input)}
    for name in tensor_names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 0), None))
    path = work_dir / "calibration.onnx"
    big = probe.ByteSize() > 1_800_000_000
    onnx.save_model(probe, str(path), save_as_external_data=big, location="calibration.onnx.data" if big else None)
    del probe
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(tensor_names, 0.0)
    count = 0
    for feed in calibration_inputs:
        feed = {k: np.asarray(v) for k, v in feed.items()}
        outs = session.run(tensor_names, feed)
        for name, value in zip(tensor_names, outs):
            value = np.abs(value.astype(np.float32))
            if not np.isfinite(value).all():
                raise ValueError(f"calibration produced non-finite values in {name!r}")
            amax[name] = max(amax[name], float(value.max(initial=0.0)))
        count += 1
    if not count:
        raise ValueError("calibration_inputs is empty: give at least one {input_name: array} feed")
    return amax


def quantize_onnx_fp8(onnx_in: str | Path, onnx_out: str | Path,
                      calibration_inputs: Iterable[Mapping[str, np.ndarray]], *, modules: str | None = PROJECTIONS,
                      min_dim: int = MIN_DIM) -> dict:
    """Write ``onnx_out``: ``onnx_in`` with FP8 Q/DQ on the selected projections (see module doc).

    ``calibration_inputs``: feeds ``{input_name: numpy array}`` for onnxruntime, in the graph's dtypes.
    Returns counts, the activation scales and the sizes before/after.
    """
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    start = time.perf_counter()
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:
        raise ValueError(f"{onnx_in} is opset {opset}: float8 QuantizeLinear/DequantizeLinear need opset >= 19")
    nodes = select_fp8_nodes(model, modules=modules, min_dim=min_dim)
    if not nodes:
        raise ValueError(f"{onnx_in} has no MatMul/Gemm with a 2-D weight initializer (K, N multiples of "
                         f"{min_dim}) in modules matching {modules!r} to quantise")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    activations = list(dict.fromkeys(n.input[0] for n in nodes))

    work_dir = Path(tempfile.mkdtemp(prefix="fp8-calibration-"))
    try:
        amax = _calibrate_amax(model, activations, calibration_inputs, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    # Which initializers other (unquantised) nodes still read: those keep their 16-bit copy.
    chosen = {id(n) for n in nodes}
    readers: dict[str, int] = {}
    for n in graph.node:
        if id(n) not in chosen:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1

    new_inits, before = [], {}  # node id -> nodes to insert before it
    replaced: set[str] = set()
    act_dq: dict[str, str] = {}
    scales = {}
    for node in nodes:
        weight = inits[node.input[1]]
        w = numpy_helper.to_array(weight)
        hp_dtype = w.dtype  # the graph's 16-bit (or fp32) dtype: scales and DQ outputs use it
        axis = _weight_layout(node, weight)
        tag = node.name or node.output[0]
        inserted = []

        x = node.input[0]
        if x not in act_dq:
            scale = max(amax[x], 1e-12) / FP8_MAX
            scales[x] = scale
            s_name, z_name = f"{x}_fp8_scale", f"{x}_fp8_zero"
            new_inits += [numpy_helper.from_array(np.array(scale, dtype=hp_dtype), s_name),
                          helper.make_tensor(z_name, TensorProto.FLOAT8E4M3FN, [], [0.0])]
            q_out, dq_out = f"{x}_fp8_q", f"{x}_fp8_dq"
            inserted += [helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], name=f"{x}_QuantizeLinear"),
                         helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{x}_DequantizeLinear")]
            act_dq[x] = dq_out
        node.input[0] = act_dq[x]

        w32 = w.astype(np.float32)
        reduce_axis = 1 - axis
        w_scale = np.maximum(np.abs(w32).max(axis=reduce_axis), 1e-12) / FP8_MAX  # one per output channel
        shape = [1, 1]
        shape[axis] = -1
        q = np.clip(w32 / w_scale.reshape(shape), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        wq_name, ws_name, wz_name = f"{weight.name}_fp8", f"{weight.name}_fp8_scale", f"{weight.name}_fp8_zero"
        w_tensor = helper.make_tensor(wq_name, TensorProto.FLOAT8E4M3FN, list(q.shape),
                                      q.view(np.uint8).tobytes(), raw=True)
        new_inits += [w_tensor, numpy_helper.from_array(w_scale.astype(hp_dtype), ws_name),
                      helper.make_tensor(wz_name, TensorProto.FLOAT8E4M3FN, list(w_scale.shape), np.zeros(w_scale.shape).tolist())]
        w_dq = f"{weight.name}_fp8_dq"
        inserted.append(helper.make_node("DequantizeLinear", [wq_name, ws_name, wz_name], [w_dq],
                                         name=f"{tag}_weight_DequantizeLinear", axis=axis))
        replaced.add(weight.name)
        node.input[1] = w_dq
        before[id(node)] = inserted

    # Drop 16-bit weights nobody reads any more; splice the new nodes in front of their consumers.
    dropped = replaced - set(readers)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    ordered = []
    for n in graph.node:
        ordered.extend(before.get(id(n), []))
        ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)

    onnx.checker.check_model(model)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_800_000_000
    tmp = onnx_out.with_name(f".{onnx_out.name}.tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=big, location=onnx_out.name + ".data" if big else None)
    tmp.replace(onnx_out)
    return {
        "path": str(onnx_out),
        "quantized_nodes": [n.name for n in nodes],
        "activation_scales": scales,
        "weights_fp8": len(nodes),
        "activation_qdq_pairs": len(act_dq),
        "bytes_in": onnx_in.stat().st_size,
        "bytes_out": onnx_out.stat().st_size,
        "seconds": time.perf_counter() - start,
    }
