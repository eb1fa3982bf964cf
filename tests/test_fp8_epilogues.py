"""Speed III's FP8 kernels against the unfused FP8 maths they replace: the one-pass per-token
quantisation (the FP8 text encoder's inputs, the attention output) and our FP8 GEMM with the SiLU gate
and row amax in its epilogue (model/fp8_gemm.py). The switches are checked on the CPU (off, and the
torch maths kept); the kernels on a GPU (marked gpu)."""

import pytest
import torch

from zimage_trt.model import fp8_gemm, fused_kernels
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.fp8 import FP8_MAX, Fp8Linear, quantize_text_encoder_fp8, set_input_quantizer
from zimage_trt.runtime import placement
from zimage_trt.testing.tiny import FP8_GPU_TINY, make_tiny_components, make_tiny_transformer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def torch_rows(x):
    """Fp8Linear.forward's own quantisation, in torch ops."""
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (rows.float() / scale).to(torch.float8_e4m3fn), scale


def test_switches_default_as_measured_and_say_what_they_take(monkeypatch):
    """The FP8 epilogue GEMM off (measured slower on the H200), the FP8 text kernel on (measured faster)."""
    monkeypatch.delenv(fp8_gemm.FP8_EPILOGUES_ENV, raising=False)
    monkeypatch.delenv(placement.TEXT_FP8_KERNEL_ENV, raising=False)
    assert fp8_gemm.epilogues_wanted(None) is False and fp8_gemm.epilogues_wanted(True) is True
    assert placement.text_fp8_kernel_wanted(None) is True and placement.text_fp8_kernel_wanted(False) is False
    monkeypatch.setenv(placement.TEXT_FP8_KERNEL_ENV, "0")
    assert placement.text_fp8_kernel_wanted(None) is False and placement.text_fp8_kernel_wanted(True) is True
    monkeypatch.setenv(fp8_gemm.FP8_EPILOGUES_ENV, "1")
    assert fp8_gemm.epilogues_wanted(None) is True and fp8_gemm.epilogues_wanted(False) is False
    with pytest.raises(TypeError, match="fp8_epilogues must be True, False or None"):
        fp8_gemm.epilogues_wanted("yes")
    with pytest.raises(TypeError, match="text_encoder_fp8_kernel must be True, False or None"):
        placement.use_text_encoder_fp8_kernel(None, 1, torch.device("cpu"))
    # asked for on the CPU: the kernel cannot run there, so it stays off and the layers keep torch ops
    te = make_tiny_components(seed=0)["text_encoder"].to(torch.bfloat16)
    swapped = quantize_text_encoder_fp8(te)
    assert placement.use_text_encoder_fp8_kernel(te, True, torch.device("cpu")) is False
    assert all(m.input_quantizer is None for m in te.modules() if isinstance(m, Fp8Linear))
    assert set_input_quantizer(te, torch_rows) == swapped


def test_an_fp8_layer_uses_its_input_quantizer_only_on_cuda():
    calls = []

    def counting(rows):
        calls.append(rows.shape)
        return torch_rows(rows)

    layer = Fp8Linear(torch.nn.Linear(32, 16).to(torch.bfloat16))
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    plain = layer(x)
    layer.input_quantizer = counting
    assert torch.equal(layer(x), plain) and calls == []  # CPU tensors: the torch path, untouched


def test_denoiser_blocks_take_the_epilogue_switch_only_with_fused_kernels(monkeypatch):
    monkeypatch.setenv(fp8_gemm.FP8_EPILOGUES_ENV, "1")
    den = StaticZImageDenoiser(make_tiny_components(seed=4)["transformer"])
    assert not any(b.fp8_epilogues for _, b in den.named_blocks())  # fused kernels off: nothing fused
    den.set_fused_kernels(True)
    assert all(b.fp8_epilogues for _, b in den.named_blocks())
    den.set_fused_kernels(True, fp8_epilogues=False)
    assert not any(b.fp8_epilogues for _, b in den.named_blocks())


gpu_triton = pytest.mark.skipif(not (fused_kernels.AVAILABLE and fp8_gemm.AVAILABLE),
                                reason="Triton (with tensor descriptors) is not installed")


@pytest.mark.gpu
@gpu_triton
@pytest.mark.parametrize("shape", [(4256, 2560), (77, 9728), (3, 192)])
def test_quantize_rows_matches_the_fp8_linear_maths(shape):
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
    x[1] *= 100  # rows of very different ranges: one scale each
    q, scale = fused_kernels.quantize_rows_fp8(x)
    ref_q, ref_scale = torch_rows(x)
    assert torch.equal(scale, ref_scale)  # the amax is exact (a max of the same values)
    assert (q.float() != ref_q.float()).float().mean().item() < 1e-3  # bar division ulps at rounding ties
    layer = Fp8Linear(torch.nn.Linear(shape[1], 64, device="cuda").to(torch.bfloat16))
    plain = layer(x)
    layer.input_quantizer = fused_kernels.quantize_rows_fp8
    assert rel(layer(x), plain) < 1e-2


@pytest.mark.gpu
@gpu_triton
# (n = 1008: ragged for the kernel's tiles, yet a multiple of 16, which the cuBLAS reference needs: 1000 is
# refused by torch._scaled_mm, "mat2 shape (160x1000) must be divisible by 16", seen on the H200)
@pytest.mark.parametrize("m, n, k", [(4256, 10240, 3840), (333, 512, 192), (64, 1008, 160)])
def test_swiglu_fp8_matches_two_products_and_the_silu_mul_quant_kernel(m, n, k):
    gen = torch.Generator("cuda").manual_seed(0)
    w1, w3 = (Fp8Linear(torch.nn.Linear(k, n, bias=False, device="cuda").to(torch.bfloat16)) for _ in range(2))
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) * 2
    x8, xs = torch_rows(x)
    ref_q, ref_s = fused_kernels.silu_mul_quant_fp8(w1.forward_quantised(x8, xs, (m,)), w3.forward_quantised(x8, xs, (m,)))
    q, s = fp8_gemm.swiglu_fp8(x8, xs, w1, w3)
    assert q.shape == (m, n) and q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
    # two FP8 GEMMs accumulating in different orders: 16-bit g and u differ by an ulp here and there,
    # which moves a row's amax by about that much and flips an e4m3 code now and then
    assert torch.allclose(s, ref_s, rtol=2e-2)
    assert rel(q.float() * s, ref_q.float() * ref_s) < 2e-2


@pytest.mark.gpu
@gpu_triton
def test_fp8_blocks_with_epilogues_are_as_close_to_bf16_as_without():
    # As for the fused kernels (tests/test_fused_kernels.py): two FP8 paths that round differently part by
    # a few percent, so each is held to its distance from bf16.
    tr = make_tiny_transformer(seed=4, **FP8_GPU_TINY).to("cuda", torch.bfloat16)
    den = StaticZImageDenoiser(tr)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 32, 32, generator=gen).cuda(), torch.tensor([0.3], device="cuda")
    cap, lens = torch.randn(1, 64, 32, generator=gen).cuda().bfloat16(), torch.tensor([64], device="cuda")
    with torch.no_grad():
        bf16 = den(x, t, cap, lens, mask_caption_keys=False)
        den.quantize_fp8()
        den.set_fused_kernels(True, fp8_epilogues=False)
        without = den(x, t, cap, lens, mask_caption_keys=False)
        den.set_fused_kernels(True, fp8_epilogues=True)
        with_epilogues = den(x, t, cap, lens, mask_caption_keys=False)
        for _, block in den.named_blocks():
            block.compile(fullgraph=True)  # the custom ops inside Inductor graphs, as engines run them
        compiled = den(x, t, cap, lens, mask_caption_keys=False)
    assert rel(with_epilogues, without) < 6e-2
    assert rel(with_epilogues, bf16) < 1.2 * rel(without, bf16) + 2e-3
    # Compiled, Inductor rounds the bf16 element-wise work between the products otherwise, and each 16-bit
    # flip moves an e4m3 code: the same few-percent parting as any two FP8 paths (0.025 seen on the H200),
    # so the same bound as the eager pair's.
    assert rel(compiled, with_epilogues) < 6e-2


@pytest.mark.gpu
@gpu_triton
def test_fp8_text_encoder_with_the_kernel_gives_the_features_without_it():
    te = make_tiny_components(seed=0)["text_encoder"].to("cuda", torch.bfloat16)
    quantize_text_encoder_fp8(te)
    ids = torch.randint(0, 200, (2, 64), device="cuda")
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        plain = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        assert placement.use_text_encoder_fp8_kernel(te, True, torch.device("cuda")) is True
        fused = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    assert rel(fused, plain) < 2e-2  # same codes bar rounding ties, carried through two layers


@pytest.mark.parametrize("value, on", [("1", True), ("on", True), ("TRUE", True), (" Yes ", True),
                                       ("0", False), ("off", False), ("False", False), ("NO", False)])
def test_both_switches_read_their_variable_the_same_way(monkeypatch, value, on):
    """`=off` (or false, no) switches either off, and `=on` either on: one spelling for both variables."""
    monkeypatch.setenv(fp8_gemm.FP8_EPILOGUES_ENV, value)
    monkeypatch.setenv(placement.TEXT_FP8_KERNEL_ENV, value)
    assert fp8_gemm.epilogues_wanted(None) is on and placement.text_fp8_kernel_wanted(None) is on


def test_a_switch_value_that_is_neither_on_nor_off_names_its_variable(monkeypatch):
    monkeypatch.setenv(fp8_gemm.FP8_EPILOGUES_ENV, "enabled")
    with pytest.raises(ValueError, match=fp8_gemm.FP8_EPILOGUES_ENV):
        fp8_gemm.epilogues_wanted(None)
    monkeypatch.setenv(placement.TEXT_FP8_KERNEL_ENV, "2")
    with pytest.raises(ValueError, match=placement.TEXT_FP8_KERNEL_ENV):
        placement.text_fp8_kernel_wanted(None)
    monkeypatch.setenv(placement.TEXT_FP8_KERNEL_ENV, "")  # empty is unset: the default
    assert placement.text_fp8_kernel_wanted(None) is True
