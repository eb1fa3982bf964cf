"""LoRA on ZImageTRTPipeline against diffusers' ZImagePipeline + the same LoRA (tiny model, CPU, fp32).

The adapters are made here with PEFT on the tiny transformer and saved in diffusers' format and in a
kohya-style layout (lora_unet_*, lora_down/lora_up, .alpha) that diffusers' Z-Image converter reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zimage_trt.lora.adapters import LoraError
from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.testing.tiny import save_tiny_pipeline, tiny_transformer_config

PIXEL_TOLERANCE = 1.0 / 255.0
STEPS = 2
CALL = dict(prompt="a red fox in the snow", height=256, width=256, num_inference_steps=STEPS, guidance_scale=0.0)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_lora(seed: int, rank: int, alpha: float, targets=TARGETS, transformer_config=None):
    """(PEFT state dict without prefix, LoraConfig) of a random LoRA on the tiny transformer
    (`transformer_config` overrides entries of its config, as in save_tiny_pipeline)."""
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel.from_config({**tiny_transformer_config(), **(transformer_config or {})})
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        transformer.add_adapter(config, adapter_name="made")
        state = get_peft_model_state_dict(transformer, adapter_name="made")
    # PEFT's random B is as large as A: keep the adapter's effect visible but the images unsaturated.
    return {k: (v * 0.3 if "lora_B" in k else v).contiguous() for k, v in state.items()}, config


def kohya_layout(state: dict, alpha: float) -> dict:
    """The same LoRA as kohya-style trainers write it: lora_unet_<module_with_underscores>.lora_down/up + .alpha."""
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


def write_loras(folder):
    """a.safetensors (diffusers format, alpha 8 / rank 4) and b_kohya.safetensors (rank 2, alpha 1: the
    converter folds alpha / rank into the factors) in `folder`."""
    from diffusers import ZImagePipeline

    state_a, config_a = make_lora(1, rank=4, alpha=8)
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=state_a, weight_name="a.safetensors",
                                     transformer_lora_adapter_metadata=config_a.to_dict())
    state_b, _ = make_lora(2, rank=2, alpha=1, targets=["to_q", "to_v", "w2"])
    save_file(kohya_layout(state_b, alpha=1), folder / "b_kohya.safetensors")
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return write_loras(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def pipe(tiny_path):
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.close()


@pytest.fixture
def clean(pipe):
    """The module's pipeline with no adapter, before and after the test."""
    pipe.unload_lora_weights()
    yield pipe
    pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def base_image(pipe):
    return ours(pipe)


def reference(tiny_path):
    from diffusers import ZImagePipeline

    ref = ZImagePipeline.from_pretrained(tiny_path)
    ref.set_progress_bar_config(disable=True)
    return ref


def theirs(ref):
    return ref(output_type="np", generator=torch.Generator().manual_seed(0), **CALL).images


def ours(pipe):
    return pipe(output_type="np", generator=torch.Generator().manual_seed(0), **CALL).images


def assert_close_images(a, b):
    assert a.shape == b.shape and np.isfinite(a).all()
    worst = float(np.abs(a - b).max())
    assert worst <= PIXEL_TOLERANCE, f"max pixel difference {worst * 255:.3f}/255"


def assert_changed(image, base):
    assert float(np.abs(image - base).max()) > 0.02, "the adapter did not change the image: the test checks nothing"


def test_one_adapter_matches_diffusers(clean, tiny_path, loras, base_image):
    ref = reference(tiny_path)
    ref.load_lora_weights(loras, weight_name="a.safetensors", adapter_name="a")
    clean.load_lora_weights(loras, weight_name="a.safetensors", adapter_name="a")
    image = ours(clean)
    assert_changed(image, base_image)
    assert_close_images(image, theirs(ref))
    assert clean.get_active_adapters() == ref.get_active_adapters() == ["a"]
    assert clean.get_list_adapters() == ref.get_list_adapters() == {"transformer": ["a"]}


def test_two_adapters_with_weights_fused_and_unfused_match_diffusers(clean, tiny_path, loras, base_image):
    """a (diffusers format) and b (kohya layout, converted by diffusers) at weights 0.7 / -0.5; then fused
    with lora_scale 0.6; then unfused again."""
    ref = reference(tiny_path)
    for pipe in (ref, clean):
        pipe.load_lora_weights(loras / "a.safetensors", adapter_name="a")
        pipe.load_lora_weights(loras, weight_name="b_kohya.safetensors", adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    assert clean.get_active_adapters() == ref.get_active_adapters() == ["a", "b"]
    unfused = ours(clean)
    assert_changed(unfused, base_image)
    assert_close_images(unfused, theirs(ref))

    for pipe in (ref, clean):
        pipe.fuse_lora(lora_scale=0.6)
    fused = ours(clean)
    assert_changed(fused, unfused)
    assert_close_images(fused, theirs(ref))

    # Unfused: the state before fuse_lora again. (diffusers leaves its layers scaled by lora_scale after
    # unfuse_lora, PEFT's scale_layer not being undone, so its image is compared before fusing, above.)
    clean.unfuse_lora()
    again = ours(clean)
    # Same pipe, same computation, weights recomputed from the kept base: bit for bit the unfused image.
    np.testing.assert_array_equal(again, unfused)


def test_kohya_layout_equals_the_same_lora_in_diffusers_format(clean, loras, tmp_path):
    """The converted layout and the diffusers layout of one adapter give the same weights."""
    from diffusers import ZImagePipeline

    state_b, config_b = make_lora(2, rank=2, alpha=1, targets=["to_q", "to_v", "w2"])
    ZImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=state_b, weight_name="b.safetensors",
                                     transformer_lora_adapter_metadata=config_b.to_dict())
    clean.load_lora_weights(tmp_path / "b.safetensors", adapter_name="b")
    layer = clean.transformer.layers[0].attention.to_q.weight
    via_diffusers_format = layer.detach().clone()
    clean.unload_lora_weights()
    clean.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
    torch.testing.assert_close(layer, via_diffusers_format, rtol=1e-6, atol=1e-6)


def test_scale_zero_disable_and_unload_give_the_base_bit_for_bit(clean, loras, base_image):
    weights = {k: v.clone() for k, v in clean.transformer.state_dict().items()}
    clean.load_lora_weights(loras / "a.safetensors", adapter_name="a")
    clean.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
    clean.set_adapters(["a", "b"], [1.0, 1.0])
    assert_changed(ours(clean), base_image)

    clean.set_adapters(["a", "b"], [0.0, 0.0])
    np.testing.assert_array_equal(ours(clean), base_image)

    clean.set_adapters(["a"], [0.8])
    clean.disable_lora()
    assert clean.get_active_adapters() == []
    np.testing.assert_array_equal(ours(clean), base_image)
    clean.enable_lora()
    assert clean.get_active_adapters() == ["a"]

    clean.delete_adapters("a")
    assert clean.get_list_adapters() == {"transformer": ["b"]}
    clean.set_adapters("b")
    clean.unload_lora_weights()
    assert clean.get_list_adapters() == {}
    for name, value in clean.transformer.state_dict().items():
        assert torch.equal(value, weights[name]), name
    np.testing.assert_array_equal(ours(clean), base_image)


def test_fuse_then_unload_keeps_the_fused_adapter_as_diffusers_does(clean, tiny_path, loras):
    ref = reference(tiny_path)
    for pipe in (ref, clean):
        pipe.load_lora_weights(loras / "a.safetensors", adapter_name="a")
        pipe.fuse_lora(lora_scale=0.5)
        pipe.unload_lora_weights()
    assert clean.get_list_adapters() == {}
    assert_close_images(ours(clean), theirs(ref))
    clean.transformer.load_state_dict(ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu").transformer.state_dict())


def test_in_memory_dict_and_default_names(clean, loras, base_image):
    from safetensors.torch import load_file

    state = load_file(loras / "a.safetensors")
    before = {name: tensor.clone() for name, tensor in state.items()}
    clean.load_lora_weights(state)
    clean.load_lora_weights(dict(state))
    assert clean.get_list_adapters() == {"transformer": ["default_0", "default_1"]}
    # the caller's dict is left whole: the same names, each tensor its own values, dtype and shape
    assert list(state) == list(before) and len(state) == 56
    for name, tensor in state.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert_changed(ours(clean), base_image)


def test_bad_adapters_are_refused_with_what_was_wrong(clean, loras, tmp_path):
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(LoraError, match="only .safetensors"):
        clean.load_lora_weights(pickle)
    with pytest.raises(LoraError, match="only .safetensors"):
        clean.load_lora_weights(loras, weight_name="lora.bin")
    weights = {k: v.clone() for k, v in clean.transformer.state_dict().items()}
    unconverted = {"model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64),
                   "model.blocks.0.attn.qkv.lora_B.weight": torch.zeros(192, 2)}
    with pytest.raises(LoraError, match="match no layer.*model.blocks.0.attn.qkv.lora_A.weight"):
        clean.load_lora_weights(unconverted)
    wrong_shape = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
                   "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(LoraError, match=r"do not fit the layer's 64 x 64 weight"):
        clean.load_lora_weights(wrong_shape)
    clean.load_lora_weights(loras / "a.safetensors", adapter_name="a")
    with pytest.raises(LoraError, match="already in use"):
        clean.load_lora_weights(loras / "a.safetensors", adapter_name="a")
    with pytest.raises(LoraError, match="no adapter named"):
        clean.set_adapters(["a", "nope"])
    with pytest.raises(LoraError, match="2 adapter names but 1"):
        clean.set_adapters(["a", "a"], [1.0])
    clean.unload_lora_weights()
    for name, value in clean.transformer.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_hotswap_replaces_an_adapter_s_weights(clean, loras):
    clean.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="x")
    want = {k: v.clone() for k, v in clean.transformer.state_dict().items()}
    clean.unload_lora_weights()
    clean.load_lora_weights(loras / "a.safetensors", adapter_name="x")
    with pytest.raises(LoraError, match="hotswap=True replaces an adapter already loaded"):
        clean.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="y", hotswap=True)
    clean.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="x", hotswap=True)
    assert clean.get_list_adapters() == {"transformer": ["x"]}
    for name, value in clean.transformer.state_dict().items():
        assert torch.equal(value, want[name]), name
