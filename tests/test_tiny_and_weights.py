"""Tiny offline Z-Image pipeline (zimage_trt.testing.tiny) and safetensors-only loading (zimage_trt.model.weights)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


from zimage_trt.testing.tiny import (
    ZIMAGE_TURBO_SCHEDULER_CONFIG,
    make_tiny_components,
    make_tiny_tokenizer,
    save_tiny_pipeline,
    tiny_transformer_config,
)
from zimage_trt.model.weights import (
    FINGERPRINT_EDGE,
    FINGERPRINT_SAMPLES,
    WeightsError,
    load_pipeline_parts,
    load_transformer,
    weights_fingerprint,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
# Outputs of two separately loaded/built models: CPU math libraries pick kernels by CPU model and memory
# alignment, so fp32 rounding order may differ (up to ~1e-5 seen on an AMD EPYC: 4.3443e-01 vs 4.3444e-01).
# 1e-4 is above that noise and 100x below what other weights change (another seed: > 1e-2).
FP32_NOISE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A saved tiny pipeline (single-file transformer). Read-only: copy before editing."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def sharded_root(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sharded") / "pipe", seed=0, shard_size="50KB")


@pytest.fixture
def root_copy(tiny_root, tmp_path):
    return Path(shutil.copytree(tiny_root, tmp_path / "pipe"))


@pytest.fixture
def sharded_copy(sharded_root, tmp_path):
    return Path(shutil.copytree(sharded_root, tmp_path / "pipe"))


def _transformer_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(16, 1, 8, 8, generator=g)]  # (C, F, H, W) per sample
    caption = [torch.randn(7, tiny_transformer_config()["cap_feat_dim"], generator=g)]
    return latents, torch.tensor([0.3]), caption


@torch.no_grad()
def _run_transformer(model):
    return model(*_transformer_inputs(), return_dict=False)[0][0]


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# --------------------------------------------------------------------------- tiny


def test_saved_tiny_pipeline_loads_and_generates_offline(tiny_root):
    from diffusers import ZImagePipeline

    files = [p for p in tiny_root.rglob("*") if p.is_file()]
    assert (tiny_root / "model_index.json").is_file()
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_root / part).is_dir()
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]

    pipe = ZImagePipeline.from_pretrained(tiny_root)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a fox",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (256, 256)
    pixels = np.asarray(image).astype(np.float32)
    assert pixels.std() > 1.0  # not a flat image


# Tongyi-MAI/Z-Image-Turbo's published scheduler/scheduler_config.json, written out here rather than read
# from the constant that wrote the tiny pipeline's file (that comparison could never fail).
PUBLISHED_TURBO_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}


def test_scheduler_matches_turbo_config(tiny_root):
    config = json.loads((tiny_root / "scheduler" / "scheduler_config.json").read_text())
    for key, value in PUBLISHED_TURBO_SCHEDULER.items():
        assert config[key] == value, key
    # The constant the runtime tests build schedulers from holds the same published values.
    assert ZIMAGE_TURBO_SCHEDULER_CONFIG == {k: v for k, v in PUBLISHED_TURBO_SCHEDULER.items() if k != "_class_name"}


def test_vae_shape_and_latent_normalisation():
    vae = make_tiny_components()["vae"]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.latent_channels == 16
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)


def test_tokenizer_handles_any_text_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = make_tiny_tokenizer()
    for text in ["a fox", "", "狐狸 🦊 naïve — ünïcödé", "<|im_start|>user"]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    assert tok("").input_ids == []
    assert tok.pad_token == "<|endoftext|>"

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "a fox"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert chat == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"

    # The pipeline pads to max_length and reads the mask back.
    batch = tok([chat], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    n = int(batch.attention_mask.sum())
    assert batch.input_ids.shape == (1, 64)
    assert (batch.input_ids[0, n:] == tok.pad_token_id).all()

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(chat).input_ids == tok(chat).input_ids
    assert again.apply_chat_template(
        [{"role": "user", "content": "a fox"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    ) == chat


def test_text_encoder_vocab_matches_tokenizer():
    parts = make_tiny_components()
    assert parts["text_encoder"].config.vocab_size == len(parts["tokenizer"])
    assert parts["transformer"].config.cap_feat_dim == parts["text_encoder"].config.hidden_size


def test_transformer_output_nonzero_and_seed_dependent():
    before = torch.random.get_rng_state()
    model0, model0_again = make_tiny_components(seed=0)["transformer"], make_tiny_components(seed=0)["transformer"]
    out0, out0_again = _run_transformer(model0), _run_transformer(model0_again)
    out1 = _run_transformer(make_tiny_components(seed=1)["transformer"])
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched

    assert torch.isfinite(out0).all()
    assert out0.abs().mean() > 1e-2
    # Same seed: the same weights, bit for bit; their outputs agree up to fp32 rounding noise (FP32_NOISE).
    _assert_same_state(model0, model0_again)
    torch.testing.assert_close(out0, out0_again, **FP32_NOISE)
    assert (out0 - out1).abs().max() > 1e-2


def test_bf16_components():
    parts = make_tiny_components(dtype=torch.bfloat16)
    assert parts["transformer"].dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- load_transformer


def test_load_transformer_all_sources_agree(tiny_root, sharded_root):
    from diffusers import ZImageTransformer2DModel

    index = sharded_root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1

    in_memory = make_tiny_components(seed=0)["transformer"]
    from_root = load_transformer(tiny_root)
    from_dir = load_transformer(tiny_root / "transformer")
    from_shards = load_transformer(sharded_root)
    from_model = load_transformer(in_memory)

    assert from_model is in_memory
    for model in (from_root, from_dir, from_shards):
        assert isinstance(model, ZImageTransformer2DModel)
        assert not model.training
        _assert_same_state(model, in_memory)  # the weights: bit for bit
    want = _run_transformer(in_memory)  # the outputs: up to fp32 rounding noise (FP32_NOISE says why)
    for model in (from_root, from_dir, from_shards):
        torch.testing.assert_close(_run_transformer(model), want, **FP32_NOISE)


def test_load_transformer_dtype(tiny_root):
    bf16 = load_transformer(tiny_root, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    stored = load_transformer(tiny_root, torch_dtype=None)
    assert all(p.dtype == torch.float32 for p in stored.parameters())


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsError, match="nowhere") as err:
        load_transformer(missing)
    assert "transformer/" in str(err.value)


def test_bin_only_folder_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"}))
    # Never loaded: the refusal must happen before anything reads it.
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.bin") as err:
        load_transformer(tmp_path)
    assert "never unpickles" in str(err.value)
    assert "safe_serialization=True" in str(err.value)


def test_bin_only_text_encoder_is_refused(root_copy):
    folder = root_copy / "text_encoder"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(WeightsError, match="pytorch_model.bin"):
        load_pipeline_parts(root_copy)


def test_missing_shard_is_named(sharded_copy):
    shard = sorted((sharded_copy / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        load_transformer(sharded_copy)


def test_truncated_safetensors_is_named(root_copy):
    file = root_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        load_transformer(root_copy)


def test_corrupt_shard_is_named(sharded_copy):
    shard = sorted((sharded_copy / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[2]
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=shard.name):
        load_transformer(sharded_copy)


def test_missing_text_encoder_shard_is_named(root_copy):
    folder = root_copy / "text_encoder"
    (folder / "model.safetensors").unlink()
    make_tiny_components(seed=0)["text_encoder"].save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(WeightsError, match=shards[-1].name):
        load_pipeline_parts(root_copy)


def test_unexpected_safetensors_names_are_listed(root_copy):
    folder = root_copy / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.fp16.safetensors"):
        load_transformer(root_copy)


def test_corrupt_vae_is_named(root_copy):
    file = root_copy / "vae" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=re.escape(str(file))):
        load_pipeline_parts(root_copy)


def test_missing_config_is_reported(root_copy):
    (root_copy / "transformer" / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_transformer(root_copy)


def test_wrong_model_class_is_reported(root_copy):
    config_file = root_copy / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "FluxTransformer2DModel"
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="FluxTransformer2DModel") as err:
        load_transformer(root_copy)
    assert "config.json" in str(err.value) and "ZImageTransformer2DModel" in str(err.value)


def test_config_weight_mismatch_is_reported(root_copy):
    config_file = root_copy / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["n_layers"] = 3  # weights hold only 2 layers
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="missing"):
        load_transformer(root_copy)


def test_wrong_module_is_refused():
    with pytest.raises(WeightsError, match="ZImageTransformer2DModel"):
        load_transformer(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- pipeline parts


def test_load_pipeline_parts(tiny_root):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Model

    reference = make_tiny_components(seed=0)
    parts = load_pipeline_parts(tiny_root)
    assert isinstance(parts["vae"], AutoencoderKL)
    assert isinstance(parts["text_encoder"], Qwen3Model)
    assert isinstance(parts["scheduler"], FlowMatchEulerDiscreteScheduler)
    assert parts["scheduler"].config.shift == 3.0
    _assert_same_state(parts["vae"], reference["vae"])
    _assert_same_state(parts["text_encoder"], reference["text_encoder"])
    assert parts["tokenizer"]("a fox").input_ids == reference["tokenizer"]("a fox").input_ids


def test_pipeline_parts_missing_subfolder(root_copy):
    shutil.rmtree(root_copy / "scheduler")
    with pytest.raises(WeightsError, match="scheduler/"):
        load_pipeline_parts(root_copy)


# --------------------------------------------------------------------------- hub ids


def test_hub_id_uses_snapshot_download(tiny_root, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, list(allow_patterns)))
        return str(tiny_root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)

    model = load_transformer("Tongyi-MAI/Z-Image-Turbo", revision="main")
    _assert_same_state(model, make_tiny_components(seed=0)["transformer"])
    parts = load_pipeline_parts("Tongyi-MAI/Z-Image-Turbo")
    assert set(parts) == {"vae", "text_encoder", "tokenizer", "scheduler"}
    assert weights_fingerprint("Tongyi-MAI/Z-Image-Turbo") == weights_fingerprint(model)

    assert [c[0] for c in calls] == ["Tongyi-MAI/Z-Image-Turbo"] * 3
    assert calls[0][1] == "main"
    for _, _, patterns in calls:
        # Only configs, safetensors and tokenizer text may be fetched: never pickles.
        assert all(p.endswith((".json", ".safetensors", ".txt", ".jinja")) for p in patterns), patterns
    assert "transformer/*.safetensors" in calls[0][2]


def test_hub_failure_is_a_weights_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsError, match="Z-Image-Turbo.*no network here"):
        load_transformer("Tongyi-MAI/Z-Image-Turbo")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_equal_across_sources(tiny_root, sharded_root):
    in_memory = make_tiny_components(seed=0)["transformer"]
    fp = weights_fingerprint(in_memory)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert weights_fingerprint(tiny_root) == fp
    assert weights_fingerprint(tiny_root / "transformer") == fp
    assert weights_fingerprint(sharded_root) == fp
    assert weights_fingerprint(load_transformer(sharded_root)) == fp
    assert weights_fingerprint(in_memory.state_dict()) == fp
    assert weights_fingerprint(make_tiny_components(seed=1)["transformer"]) != fp


def test_fingerprint_changes_with_one_element():
    model = make_tiny_components(seed=0)["transformer"]
    fp = weights_fingerprint(model)
    params = dict(model.named_parameters())

    small = params["layers.0.attention.norm_q.weight"]  # fully hashed
    big = params["t_embedder.mlp.0.weight"]  # sampled: 1024 x 256 elements
    assert small.numel() <= FINGERPRINT_SAMPLES + 2 * FINGERPRINT_EDGE < big.numel()

    with torch.no_grad():
        small.view(-1)[small.numel() // 2] += 1e-3
        fp_small = weights_fingerprint(model)
        small.view(-1)[small.numel() // 2] -= 1e-3
        assert weights_fingerprint(model) == fp

        # First, last and evenly spaced elements of a large tensor are sampled.
        for i in (0, big.numel() - 1, 7 * (big.numel() - 1) // (FINGERPRINT_SAMPLES - 1)):
            old = big.view(-1)[i].item()
            big.view(-1)[i] = old + 1.0
            assert weights_fingerprint(model) != fp
            big.view(-1)[i] = old

        assert fp_small != fp
        assert weights_fingerprint(model) == fp


def test_fingerprint_full_mode_and_dtype():
    model = make_tiny_components(seed=0)["transformer"]
    fp, fp_full = weights_fingerprint(model), weights_fingerprint(model, full=True)
    big = dict(model.named_parameters())["t_embedder.mlp.0.weight"].view(-1)
    with torch.no_grad():
        big[FINGERPRINT_EDGE + 1] += 1.0  # between the head and the second spread sample
    assert weights_fingerprint(model) == fp  # documented blind spot of sampling
    assert weights_fingerprint(model, full=True) != fp_full

    bf16 = make_tiny_components(seed=0, dtype=torch.bfloat16)["transformer"]
    assert weights_fingerprint(bf16) != weights_fingerprint(make_tiny_components(seed=0)["transformer"])


def test_fingerprint_folder_errors(root_copy):
    (root_copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        weights_fingerprint(root_copy)
