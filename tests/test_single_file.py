"""ZImageTRTPipeline.from_single_file: one .safetensors transformer checkpoint in the original (ComfyUI)
layout, written here from the tiny model, read back through diffusers' single-file converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zimage_trt.model.weights import WeightsError, load_transformer, weights_fingerprint
from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.testing.tiny import save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# diffusers name -> the original repository's (the single files ComfyUI users have).
ORIGINAL_NAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}


def original_layout(state: dict) -> dict:
    """model.diffusion_model.* keys, q/k/v fused into one qkv weight, as the original checkpoints are."""
    out = {}
    for name, tensor in state.items():
        if any(f".attention.to_{p}.weight" in name for p in "kv"):
            continue
        if ".attention.to_q.weight" in name:
            prefix = name.removesuffix("to_q.weight")
            tensor = torch.cat([state[prefix + f"to_{p}.weight"] for p in "qkv"])
            name = prefix + "qkv.weight"
        for new, old in ORIGINAL_NAMES.items():
            name = name.replace(new, old)
        out["model.diffusion_model." + name] = tensor.contiguous()
    return out


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def single_file(tiny_path, tmp_path_factory):
    state = load_transformer(tiny_path).state_dict()
    file = tmp_path_factory.mktemp("single") / "z_image_turbo_tiny.safetensors"
    save_file(original_layout(state), file)
    return file


def test_single_file_round_trip(tiny_path, single_file):
    pipe = ZImageTRTPipeline.from_single_file(single_file, config=tiny_path, device="cpu", torch_dtype=torch.float32)
    folder = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    ours, theirs = pipe.transformer.state_dict(), folder.transformer.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    call = dict(prompt="a red fox", height=256, width=256, num_inference_steps=2, output_type="np")
    for p in (pipe, folder):
        p.set_progress_bar_config(disable=True)
    a = pipe(generator=torch.Generator().manual_seed(0), **call).images
    b = folder(generator=torch.Generator().manual_seed(0), **call).images
    assert float(np.abs(a - b).max()) <= 1.0 / 255.0


def test_single_file_fingerprint_matches_the_folder_s(tiny_path, single_file, tmp_path):
    """So engines built from the folder serve the single file (and engines from other weights do not)."""
    from zimage_trt.model.single_file import load_single_file_transformer

    _, fingerprint = load_single_file_transformer(single_file, tiny_path)
    assert fingerprint == weights_fingerprint(tiny_path)
    # Other weights in the same layout: one element of one fused qkv weight changed (a small tensor, so
    # every element is hashed), then a large weight's first element (always among the sampled ones).
    state = load_transformer(tiny_path).state_dict()
    for name in ("layers.0.attention.to_k.weight", "noise_refiner.0.feed_forward.w1.weight"):
        changed = {k: v.clone() for k, v in state.items()}
        changed[name].view(-1)[0] += 1.0
        other = tmp_path / f"changed-{name}.safetensors"
        save_file(original_layout(changed), other)
        assert load_single_file_transformer(other, tiny_path)[1] != fingerprint, name


def test_single_file_refusals(tiny_path, single_file, tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"never read")
    with pytest.raises(WeightsError, match="pickle checkpoint, never unpickled"):
        ZImageTRTPipeline.from_single_file(pickle, config=tiny_path, device="cpu")
    with pytest.raises(WeightsError, match="no such file"):
        ZImageTRTPipeline.from_single_file(tmp_path / "absent.safetensors", config=tiny_path, device="cpu")
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.blocks.0.weight": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not a Z-Image transformer checkpoint.*missing"):
        ZImageTRTPipeline.from_single_file(other, config=tiny_path, device="cpu")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        ZImageTRTPipeline.from_single_file(truncated, config=tiny_path, device="cpu")
