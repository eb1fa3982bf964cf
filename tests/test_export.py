"""ONNX export of the denoiser and the VAE decoder, checked with onnx.checker and onnxruntime (CPU)."""

import onnx
import pytest
import torch

from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.compiler.export import ORT_TOLERANCE, check_with_onnxruntime, export_denoiser, export_vae_decoder
from zimage_trt.testing.tiny import make_tiny_components


@pytest.fixture(scope="module")
def components():
    return make_tiny_components(seed=5)


def test_fp32_export_matches_torch_across_shapes(components, tmp_path):
    den = StaticZImageDenoiser(components["transformer"])
    info = export_denoiser(den, tmp_path / "d.onnx")
    assert info["ort_max_rel_error"] <= ORT_TOLERANCE["fp32"] == 1e-4
    model = onnx.load(str(tmp_path / "d.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["latents", "timestep", "cap_feats", "cap_lens"]
    # One graph for every resolution, batch and caption capacity: the dims are symbolic.
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and dims[1] == 16
    # A third shape that the export never saw: batch 3, 272x400 pixels (17x25 tokens, padded), 160 rows.
    assert check_with_onnxruntime(den, tmp_path / "d.onnx", cases=[((34, 50), 160, 3)]) <= 1e-4


def test_controlnet_ready_export_takes_hints_and_matches_torch(components, tmp_path):
    """The variant's extra input: [P, batch, joint tokens, dim] with P and dim fixed, batch the other inputs'
    symbol and the tokens symbolic; onnxruntime against torch with random hints, and zero hints against the
    plain forward, on shapes the export never saw (fp32: the tolerance of the plain export)."""
    from zimage_trt.engines import contract

    den = StaticZImageDenoiser(components["transformer"])
    den.set_control_places([1, 0])
    info = export_denoiser(den, tmp_path / "c.onnx", verify=False)
    assert info["controlnet_places"] == [1, 0]
    model = onnx.load(str(tmp_path / "c.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == list(contract.CONTROLNET_INPUT_NAMES)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    places, batch, tokens, dim = dims[contract.CONTROLNET_HINTS]
    assert (places, dim) == (2, den.dim) and batch == dims["latents"][0] and isinstance(tokens, str)
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}[contract.CONTROLNET_HINTS] == \
        onnx.TensorProto.FLOAT
    # Batch 3 at 272x400 px (17x25 tokens, padded to 448) with 160 caption rows; batch 1 at 256x256.
    assert check_with_onnxruntime(den, tmp_path / "c.onnx", cases=[((34, 50), 160, 3), ((32, 32), 64, 1)]) <= 1e-4
    # The check can fail: an export whose hints join after other layers than torch's is caught.
    den.set_control_places([0, 1])
    with pytest.raises(RuntimeError, match="differs from torch"):
        check_with_onnxruntime(den, tmp_path / "c.onnx", cases=[((32, 32), 64, 1)])


@pytest.mark.slow
def test_fp16_export_is_fp16_and_close(components, tmp_path):
    import copy

    half = copy.deepcopy(components["transformer"]).half()
    den = StaticZImageDenoiser(half)
    info = export_denoiser(den, tmp_path / "h.onnx", verify=False)
    model = onnx.load(info["path"])
    weight_types = {t.data_type for t in model.graph.initializer if t.name.endswith("weight") and len(t.dims) == 2}
    assert weight_types == {onnx.TensorProto.FLOAT16}, weight_types  # strongly typed: the ONNX decides
    # fp16 tolerance (stated in export.ORT_TOLERANCE): onnxruntime's fp16 kernels against torch's.
    assert check_with_onnxruntime(den, info["path"]) <= ORT_TOLERANCE["fp16"]


@pytest.mark.slow
def test_bf16_export_is_valid(components, tmp_path):
    import copy

    den = StaticZImageDenoiser(copy.deepcopy(components["transformer"]).to(torch.bfloat16))
    info = export_denoiser(den, tmp_path / "b.onnx", verify=False)
    model = onnx.load(info["path"])
    weight_types = {t.data_type for t in model.graph.initializer if t.name.endswith("weight") and len(t.dims) == 2}
    assert weight_types == {onnx.TensorProto.BFLOAT16}


@pytest.mark.slow
def test_external_data(components, tmp_path):
    den = StaticZImageDenoiser(components["transformer"])
    info = export_denoiser(den, tmp_path / "x.onnx", external_data=True, verify=False)
    assert info["external_data"]
    assert list(tmp_path.glob("x.onnx.data")) or list(tmp_path.glob("*.data"))
    assert check_with_onnxruntime(den, tmp_path / "x.onnx") <= 1e-4
    assert not list(tmp_path.glob(".export-*")), "temporary export folder left behind"


def test_vae_decoder_export(components, tmp_path):
    info = export_vae_decoder(components["vae"], tmp_path / "vae.onnx")
    assert info["ort_max_rel_error"] <= 1e-4


class ExportBrokeOff(Exception):
    """Raised by the stand-in torch.onnx.export below once it has written its files."""


def test_failed_export_leaves_nothing(components, tmp_path, monkeypatch):
    """A failure after the exporter has written a graph and its external data into the temporary folder
    leaves no .onnx, no .data and no temporary folder behind."""
    seen = []

    def export_that_breaks_off(module, inputs, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a graph")
        with open(f"{path}.data", "wb") as f:
            f.write(b"\0" * 1024)
        # What the output folder holds at the moment of failure: {name: its files, for a folder}.
        seen.append({p.name: sorted(q.name for q in p.iterdir()) if p.is_dir() else None for p in tmp_path.iterdir()})
        raise ExportBrokeOff(f"broke off writing {path}")

    monkeypatch.setattr(torch.onnx, "export", export_that_breaks_off)
    den = StaticZImageDenoiser(components["transformer"])
    with pytest.raises(ExportBrokeOff):
        export_denoiser(den, tmp_path / "bad.onnx", external_data=True, verify=False)
    # The files went into the temporary folder (the only thing in the output folder then): cleanup had work.
    assert len(seen) == 1
    [(folder, written)] = seen[0].items()
    assert folder.startswith(".bad.onnx.export-") and written == ["bad.onnx", "bad.onnx.data"], seen
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
