"""New weight values into a built TensorRT engine, without a rebuild (LoRA on a compiled engine).

An engine built with ``refittable=True`` (``BuilderFlag.REFIT``) names its weights after the ONNX
initializers. Those are not the transformer's state-dict names: torch's ONNX exporter renames the
weights and pre-transposes those feeding a MatMul (``val_29`` is ``layers.0.attention.to_q.weight``
transposed), and may merge identical constants. So the build finds, by value, which transformer weight
each initializer holds (:func:`map_initializers`) and records it in the manifest; the refit reads that
map backwards. The fp16 overflow factors of the build scale activations, not weights (the value match
proves it: a weight the build had changed would not match). FP8 engines store quantised weights with
scales computed at build time: refitting those is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from ..manifest import Manifest
from .library import TensorRTBackendError, get_logger, torch_dtype


class RefitError(TensorRTBackendError, ValueError):
    """The weights cannot be refitted into this engine (not refittable, unknown name, wrong shape...)."""


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{tuple(tensor.shape)}".encode() + data).hexdigest()


_FLOAT_TYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def _initializer_tensor(init, folder=None) -> torch.Tensor | None:
    """A floating-point ONNX initializer as a torch tensor of its own dtype (bf16 included, which numpy
    lacks), its bytes read from the external-data file where they live there; None for other types."""
    dtype = _FLOAT_TYPES.get(init.data_type)
    if dtype is None:
        return None
    shape = tuple(init.dims)
    if init.data_location == 1:  # EXTERNAL: read this tensor's bytes alone (a 6B model's are 12 GB)
        where = {e.key: e.value for e in init.external_data}
        with open(Path(folder) / where["location"], "rb") as f:
            f.seek(int(where.get("offset", 0)))
            raw = f.read(int(where["length"])) if "length" in where else f.read()
    elif init.raw_data:
        raw = init.raw_data
    else:  # typed fields (not what torch's exporter writes, but valid ONNX)
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(init).copy()).reshape(shape)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def map_initializers(onnx_path, weights: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """``{initializer name: [[transformer weight names], "" | "T"]}`` for every initializer equal (bitwise,
    same dtype) to a transformer weight or its transpose. ``weights``: the state dict the ONNX was
    exported from, in the engine's dtype."""
    import onnx

    by_value: dict[str, tuple[list[str], str]] = {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point() or tensor.numel() < 2 or bool((tensor == tensor.flatten()[0]).all()):
            # Constant-valued (all ones, all zeros): the export may share those values with graph constants
            # that are not this weight, so they are never refitted (no trained weight looks like that).
            continue
        forms = [(tensor, "")] + ([(tensor.t(), "T")] if tensor.dim() == 2 else [])
        for form, transform in forms:
            entry = by_value.setdefault(_digest(form), ([], transform))
            if entry[1] == transform:
                entry[0].append(name)
    model = onnx.load(str(onnx_path), load_external_data=False)
    found = {}
    for init in model.graph.initializer:
        tensor = _initializer_tensor(init, Path(onnx_path).parent)
        if tensor is not None and tensor.numel() > 1:
            hit = by_value.get(_digest(tensor))
            if hit is not None:
                found[init.name] = [sorted(hit[0]), hit[1]]
    return found


def unmapped_weights(refit_weights: Mapping[str, list], weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Transformer weights no engine weight holds (folded by the export, unused, or constant-valued): those
    cannot be refitted."""
    held = {n for names, _ in refit_weights.values() for n in names}
    return sorted(n for n, t in weights.items() if t.is_floating_point() and t.numel() > 1 and n not in held)


def plan_refit(manifest: Manifest, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{engine weight name: tensor in the engine's layout}`` for the given transformer weights."""
    if manifest.precision == "fp8":
        raise RefitError("FP8 TensorRT engines cannot be refitted: their weights are stored quantised with scales "
                         "computed at build time; rebuild the engine, or use an fp16/bf16 engine for adapters")
    if not manifest.refittable:
        raise RefitError(f"engine {manifest.name} was not built refittable; rebuild it with "
                         "`zimage-trt build --refittable` (or build_engines(..., refittable=True)) to update weights")
    holders: dict[str, list[tuple[str, list[str], str]]] = {}
    for engine_name, (names, transform) in manifest.refit_weights.items():
        for name in names:
            holders.setdefault(name, []).append((engine_name, names, transform))
    unknown = sorted(set(weights) - set(holders))
    if unknown:
        raise RefitError(f"{len(unknown)} weight(s) are not refittable in engine {manifest.name}, e.g. {unknown[:5]}: "
                         "the export folded them into other constants, or they are not transformer weight names "
                         "(expected diffusers names such as 'layers.0.attention.to_q.weight')")
    plan: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        for engine_name, names, transform in holders[name]:
            value = tensor.t() if transform == "T" else tensor
            others = [n for n in names if n != name and n in weights]
            if any(not torch.equal(weights[n], tensor) for n in others):
                raise RefitError(f"{names} share one engine weight ({engine_name}: the export merged their equal "
                                 "values), so they cannot take different values; rebuild to adapt them separately")
            if len(others) != len(names) - 1:
                raise RefitError(f"{name} shares engine weight {engine_name} with {[n for n in names if n != name]} "
                                 "(the export merged their equal values): give all of them, with equal values")
            plan[engine_name] = value
    return plan


def refit_engine(engine, manifest: Manifest, weights: Mapping[str, torch.Tensor], refitter=None) -> list[str]:
    """Set every given weight by its engine name through ``trt.Refitter`` and refit; returns the engine
    names set. Nothing is refitted unless every weight is accepted (names, shapes, dtypes)."""
    plan = plan_refit(manifest, weights)
    if not plan:
        return []
    if not getattr(engine, "refittable", False):
        raise RefitError(f"engine {manifest.name} was not built refittable (the plan says so); rebuild it with --refittable")
    trt = engine.trt
    logger = get_logger(trt)
    refitter = refitter or trt.Refitter(engine._engine, logger)
    known = set(refitter.get_all_weights())
    missing_names = sorted(set(plan) - known)
    if missing_names:
        raise RefitError(f"the engine's refitter does not know {missing_names[:5]}: engine and manifest disagree; rebuild")
    keep = []  # the values must stay alive until the refit has run
    for engine_name, value in plan.items():
        prototype = refitter.get_weights_prototype(engine_name)
        dtype = torch_dtype(prototype.dtype)
        if value.numel() != int(prototype.size):
            raise RefitError(f"{engine_name}: {value.numel()} values given, the engine holds {int(prototype.size)}")
        value = value.detach().to(dtype).contiguous()
        keep.append(value)
        location = trt.TensorLocation.DEVICE if value.is_cuda else trt.TensorLocation.HOST
        weights_obj = trt.Weights(prototype.dtype, value.data_ptr(), value.numel())
        with logger.capture() as logged:
            accepted = refitter.set_named_weights(engine_name, weights_obj, location)
        if not accepted:
            raise RefitError(f"TensorRT refused the values for {engine_name}: " + ("; ".join(logged) or "(no reason logged)"))
    still_missing = [n for n in refitter.get_missing_weights() if n]
    if still_missing:
        raise RefitError(f"TensorRT needs these weights refitted together with the given ones: {still_missing[:5]} "
                         "(it combined them at build); pass their transformer weights too")
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)  # no enqueued work may be pending while weights change
    with logger.capture() as logged:
        ok = refitter.refit_cuda_engine()
    if not ok:
        raise RefitError("refit_cuda_engine failed: " + ("; ".join(logged) or "(no reason logged)"))
    del keep
    return sorted(plan)
