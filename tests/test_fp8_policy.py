"""FP8 quality policy (compiler/fp8_policy.py): the sensitivity pass finds blocks that FP8 damages and
`--fp8-keep auto` keeps them bf16. CPU: torch._scaled_mm runs e4m3 products there too."""

import pytest
import torch

from zimage_trt.compiler.fp8_policy import check_fp8_keep_policy, choose_fp8_keep, fp8_sensitivity
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.fp8 import Fp8Linear, is_fp8_block
from zimage_trt.testing.tiny import make_tiny_transformer

PLANTED = ("layers.1", "layers.3")


def plant_outlier_channels(transformer, names, factor=1e5, channels=3, seed=0):
    """Massive activation channels as trained models have them: a few RMSNorm gains times `factor`,
    the weights reading those channels divided by it. In exact arithmetic the model is unchanged; in
    per-token FP8 every other channel of a token falls `factor` below its scale, into e4m3's subnormals."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            group, i = name.split(".")
            block = getattr(transformer, group)[int(i)]
            ch = torch.randperm(block.ffn_norm1.weight.numel(), generator=gen)[:channels]
            att, ff = block.attention, block.feed_forward
            for norm, readers in ((block.attention_norm1, (att.to_q, att.to_k, att.to_v)), (block.ffn_norm1, (ff.w1, ff.w3))):
                norm.weight[ch] *= factor
                for linear in readers:
                    linear.weight[:, ch] /= factor


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.slow  # ~20 s on a busy 2-core CPU: 8 forwards of the tiny model with FP8 products
def test_auto_policy_finds_and_keeps_the_damaged_blocks():
    transformer = make_tiny_transformer(seed=1, n_layers=5).to(torch.bfloat16)
    plant_outlier_channels(transformer, PLANTED)
    den = StaticZImageDenoiser(transformer)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([0.3, 0.8]),
              torch.randn(2, 32, 32, generator=gen).bfloat16(), torch.tensor([32, 20]))
    with torch.no_grad():
        reference = den(*inputs)
    sensitivity = fp8_sensitivity(den, inputs)
    names = [n for n, _ in den.named_blocks()]
    assert set(sensitivity) == set(names)
    assert not any(is_fp8_block(b.block) for _, b in den.named_blocks())  # the pass left the model 16-bit
    with torch.no_grad():
        assert torch.equal(den(*inputs), reference)
    ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
    assert set(ranked[:2]) == set(PLANTED), sensitivity
    keep = choose_fp8_keep("auto", sensitivity, names)
    assert set(keep) == set(PLANTED)

    # Keeping them bf16 brings the FP8 model closer to the 16-bit one than quantising everything.
    import copy
    errors = {}
    for label, kept in (("all", []), ("policy", keep)):
        model = copy.deepcopy(transformer)
        d = StaticZImageDenoiser(model)
        d.quantize_fp8(keep=kept)
        with torch.no_grad():
            errors[label] = rel(d(*inputs), reference)
        fp8_blocks = {n for n, b in d.named_blocks() if is_fp8_block(b.block)}
        assert fp8_blocks == set(names) - set(kept)
    assert errors["policy"] < 0.8 * errors["all"], errors


def test_policy_choices_and_their_errors():
    names = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1", "layers.2", "layers.3"]
    flat = {n: 0.02 for n in names}
    assert choose_fp8_keep("auto", flat, names) == []  # nothing stands out: nothing kept
    spiky = {**flat, "layers.2": 0.09, "layers.0": 0.07, "layers.3": 0.041}
    assert choose_fp8_keep("auto", spiky, names) == ["layers.2", "layers.0"]  # cap: a quarter, rounded up
    assert choose_fp8_keep("none", spiky, names) == []
    assert choose_fp8_keep("layers.3, noise_refiner.0", None, names) == ["noise_refiner.0", "layers.3"]
    with pytest.raises(ValueError, match="unknown blocks \\['layer.3'\\]"):
        choose_fp8_keep("layer.3", None, names)
    with pytest.raises(ValueError, match="needs the measured sensitivity"):
        choose_fp8_keep("auto", None, names)
    with pytest.raises(ValueError, match="'auto', 'none' or a comma-separated list"):
        check_fp8_keep_policy(" ")


def test_quantize_fp8_keeps_the_named_blocks_and_rejects_unknown_names():
    transformer = make_tiny_transformer(seed=2).to(torch.bfloat16)
    den = StaticZImageDenoiser(transformer)
    with pytest.raises(ValueError, match="unknown blocks \\['layers.9'\\]"):
        den.quantize_fp8(keep=["layers.9"])
    den.quantize_fp8(keep=["layers.1"])
    assert den.fp8_keep == ["layers.1"]
    assert not any(isinstance(m, Fp8Linear) for m in den.layers[1].modules())
    assert is_fp8_block(den.layers[0].block) and is_fp8_block(den.noise_refiner[0].block)
