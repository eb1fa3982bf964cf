"""Denoiser and VAE decoder -> ONNX, in the precision the engine will run (fp32 / fp16 / bf16).

TensorRT 10+ and TensorRT-RTX build *strongly typed* networks: the ONNX's own dtypes decide the
engine's precision, so the export itself is fp16 or bf16, with fp32 kept where the reference computes
in fp32 (timestep embedding, RoPE, RMSNorm statistics). One ONNX has symbolic batch, latent height and
width and caption capacity, so one engine can hold one fixed-shape profile per resolution while
storing the weights once. Past 2 GB the weights go to an external-data file beside the .onnx.

A denoiser with `control_places` set (`StaticZImageDenoiser.set_control_places`) exports the
ControlNet-ready variant: one more input, `controlnet_hints` [P, batch, joint tokens, dim], P and the
places fixed in the graph, batch the same symbol as the other inputs', and the joint tokens (image
tokens padded to 32, plus the caption capacity) a symbol the graph ties to the latent size and capacity.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..engines import contract
from ..model.denoiser import StaticZImageDenoiser
from ..model.precision import precision_of
from ..files import publish, sha256_file, staged

OPSET = 20
# onnxruntime (CPU) against torch, relative to the output's peak |value|. fp16 differs by rounding
# order across ~40 chained matrix products: the tiny test model lands near 1e-3.
ORT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def example_inputs(denoiser: StaticZImageDenoiser, latent_hw=(32, 32), capacity=64, batch=1):
    """Inputs for export and checks: captions a few rows short of the capacity, so the mask matters."""
    return contract.example_inputs(batch, latent_hw, capacity, denoiser.caption_dim, denoiser.dtype, denoiser.device,
                                   caption_length=max(1, capacity - 7), channels=denoiser.in_channels)


def example_hints(denoiser: StaticZImageDenoiser, latent_hw=(32, 32), capacity=64, batch=1, seed=0):
    """Random hints for the ControlNet-ready variant (one per control place), or None for a plain denoiser."""
    if not denoiser.control_places:
        return None
    return contract.example_hints(len(denoiser.control_places), batch, latent_hw, capacity, denoiser.dim,
                                  denoiser.dtype, denoiser.device, generator=torch.Generator().manual_seed(seed))


def export_denoiser(denoiser: StaticZImageDenoiser, onnx_path: str | Path, *, max_batch=16, max_capacity=512,
                    max_latent_side=256, verify: bool = True, external_data: bool | None = None) -> dict:
    """Export with symbolic batch, latent size (even) and caption capacity (multiple of 32); with the
    denoiser's `control_places` set, the ControlNet-ready variant (module doc).

    Writes `onnx_path` (plus `onnx_path.data` when weights go external) atomically: into a temporary
    folder first, moved into place only once the export and the checker succeeded.
    """
    from torch.export import Dim

    onnx_path = Path(onnx_path)
    denoiser.eval()
    batch = Dim("batch", min=1, max=max_batch)
    half_h = Dim("latent_h_half", min=8, max=max_latent_side // 2)
    half_w = Dim("latent_w_half", min=8, max=max_latent_side // 2)
    cap_blocks = Dim("caption_blocks", min=1, max=max_capacity // 32)
    places = list(denoiser.control_places)
    # The hints' token axis is the graph's own joint length, round_up(h/2 * w/2, 32) + capacity: not an
    # expression torch.export's Dims can spell, so AUTO lets the exporter derive (and name) it.
    dynamic = contract.as_feed(({0: batch, 2: 2 * half_h, 3: 2 * half_w}, {0: batch}, {0: batch, 1: 32 * cap_blocks},
                                {0: batch}), controlnet_hints={1: batch, 2: Dim.AUTO} if places else None)
    inputs = example_inputs(denoiser)
    hints = example_hints(denoiser)
    n_params = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    # protobuf caps a file at 2 GB: past ~1.8 GB of weights they go to NAME.onnx.data.
    external = n_params > 1.8e9 if external_data is None else external_data
    start = time.perf_counter()
    _export_atomically(denoiser, inputs, onnx_path,
                       input_names=list(contract.CONTROLNET_INPUT_NAMES if places else contract.INPUT_NAMES),
                       output_names=list(contract.OUTPUT_NAMES), dynamic_shapes=dynamic,
                       external_data=external, kwargs=None if hints is None else {contract.CONTROLNET_HINTS: hints})
    info = {
        "controlnet_places": places,
        "path": str(onnx_path),
        "seconds": time.perf_counter() - start,
        "external_data": external,
        "bytes": sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*")),
        "sha256": sha256_file(onnx_path),
    }
    if verify:
        info["ort_max_rel_error"] = check_with_onnxruntime(denoiser, onnx_path)
    return info


def _export_atomically(module, inputs, onnx_path: Path, **options) -> None:
    """torch.onnx.export into a staged folder, onnx.checker, then publish the .onnx (and its external
    data): data first, graph last, so a failure never leaves a loadable half."""
    import onnx

    with staged(onnx_path.parent, f"{onnx_path.name}.export-", directory=True) as tmp_dir:
        tmp_path = tmp_dir / onnx_path.name
        with _quiet(), torch.no_grad():
            torch.onnx.export(module, inputs, str(tmp_path), dynamo=True, opset_version=OPSET, verbose=False, **options)
        onnx.checker.check_model(str(tmp_path))
        for item in sorted(tmp_dir.iterdir()):
            if item.name != onnx_path.name:
                publish(item, onnx_path.parent / item.name)
        publish(tmp_path, onnx_path)


def onnxruntime_outputs(onnx_path: str | Path, inputs: tuple[torch.Tensor, ...], names=contract.INPUT_NAMES):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
    return session.run(None, feed)


def check_with_onnxruntime(denoiser: StaticZImageDenoiser, onnx_path: str | Path, cases=None) -> float:
    """Max relative error of onnxruntime against torch over a few shapes; raises past the tolerance.

    The ControlNet-ready variant is checked twice per shape: with random hints against torch with the same
    hints, and with zero hints against torch's plain (hint-free) forward."""
    precision = precision_of(denoiser.dtype)
    cases = cases or [((32, 32), 64, 1), ((34, 40), 96, 2)]
    worst = 0.0
    for latent_hw, capacity, batch in cases:
        inputs = example_inputs(denoiser, latent_hw, capacity, batch)
        hints = example_hints(denoiser, latent_hw, capacity, batch)
        runs = [(hints, hints)] if hints is None else [(hints, hints), (torch.zeros_like(hints), None)]
        for fed, in_torch in runs:
            with torch.no_grad():
                expected = denoiser(*inputs, controlnet_hints=in_torch).float().cpu().numpy()
            names = contract.INPUT_NAMES if fed is None else contract.CONTROLNET_INPUT_NAMES
            got = onnxruntime_outputs(onnx_path, inputs if fed is None else (*inputs, fed), names)[0].astype(np.float32)
            scale = float(np.abs(expected).max()) or 1.0
            worst = max(worst, float(np.abs(got - expected).max()) / scale)
    if not worst <= ORT_TOLERANCE[precision]:
        raise RuntimeError(
            f"onnxruntime output of {onnx_path} differs from torch by {worst:.2e} (relative), over the "
            f"{precision} tolerance {ORT_TOLERANCE[precision]:.0e}"
        )
    return worst


class VaeDecoderGraph(torch.nn.Module):
    """latents (the denoiser's space) -> image in [-1, 1], with the pipeline's scale and shift folded in."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)

    def forward(self, latents):
        latents = latents.to(self.vae.dtype) / self.scaling + self.shift
        return self.vae.decode(latents, return_dict=False)[0].float()


def export_vae_decoder(vae, onnx_path: str | Path, *, max_latent_side=256, verify: bool = True) -> dict:
    """Batch 1 (diffusers' decoder guards on batch <= 2 when traced, so images decode one by one);
    symbolic latent height and width."""
    from torch.export import Dim

    onnx_path = Path(onnx_path)
    graph = VaeDecoderGraph(vae).eval()
    h, w = Dim("latent_h", min=16, max=max_latent_side), Dim("latent_w", min=16, max=max_latent_side)
    example = torch.randn(1, vae.config.latent_channels, 32, 32, device=vae.device)
    start = time.perf_counter()
    _export_atomically(graph, (example,), onnx_path, input_names=["latents"], output_names=["image"],
                       dynamic_shapes={"latents": {2: h, 3: w}})
    info = {"path": str(onnx_path), "seconds": time.perf_counter() - start, "sha256": sha256_file(onnx_path)}
    if verify:
        example = torch.randn(1, vae.config.latent_channels, 32, 48, device=vae.device)
        with torch.no_grad():
            expected = graph(example).cpu().numpy()
        got = onnxruntime_outputs(onnx_path, (example,), names=("latents",))[0]
        info["ort_max_rel_error"] = float(np.abs(got - expected).max() / (np.abs(expected).max() or 1.0))
    return info
