"""The attention-backend switch (model/attention.py): resolution, fallbacks and what each op computes.

CPU: the switch's decisions and the fallback maths. GPU (gpu-marked): FA3 16-bit and FP8 against SDPA on
the full-size attention shapes, and a whole tiny denoiser with each backend against SDPA.
"""


import pytest
import torch

from zimage_trt.model import attention
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.testing.tiny import FP8_GPU_TINY, make_tiny_components, make_tiny_transformer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_auto_falls_back_to_sdpa_and_says_why_when_fa3_is_asked_for():
    cpu = torch.device("cpu")
    assert attention.resolve_attention_backend("auto", cpu) == "sdpa"
    assert attention.resolve_attention_backend(None, cpu) == "sdpa"
    assert attention.resolve_attention_backend("sdpa", cpu) == "sdpa"
    for name in ("fa3", "fa3-fp8"):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            attention.resolve_attention_backend(name, cpu)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*auto"):
        attention.resolve_attention_backend("flash", cpu)


def test_auto_picks_fa3_where_it_can_run():
    can = lambda device: None  # noqa: E731  (a device where FA3 imports and runs)
    cannot = lambda device: "no FlashAttention-3 module imports"  # noqa: E731
    dev = torch.device("cpu")
    assert attention.resolve_attention_backend("auto", dev, unavailable=can) == "fa3"
    assert attention.resolve_attention_backend("auto", dev, precision="fp8", unavailable=can) == "fa3-fp8"
    assert attention.resolve_attention_backend("auto", dev, precision="fp16", unavailable=can) == "fa3"
    assert attention.resolve_attention_backend("fa3", dev, precision="fp8", unavailable=can) == "fa3"  # asked for
    assert attention.resolve_attention_backend("auto", dev, precision="fp8", unavailable=cannot) == "sdpa"
    assert attention.resolve_attention_backend("fa3-fp8", dev, unavailable=can) == "fa3-fp8"
    assert attention.resolve_attention_backend("auto", dev, unavailable=cannot) == "sdpa"
    with pytest.raises(RuntimeError, match="no FlashAttention-3 module imports.*'sdpa' or 'auto'"):
        attention.resolve_attention_backend("fa3", dev, unavailable=cannot)


def fake_fa3(calls):
    """A stand-in with FA3's signature computing exact attention, recording the dtypes it was given."""
    def func(q, k, v, q_descale=None, k_descale=None, v_descale=None):
        calls.append((q.dtype, None if q_descale is None else tuple(q_descale.shape)))
        if q_descale is not None:  # FP8 inputs: dequantise with the per-(item, head) descales
            q, k, v = (t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
            out = attention.sdpa_attention(q, k, v, None).to(torch.bfloat16)
        else:
            out = attention.sdpa_attention(q, k, v, None)
        return out, None  # some builds return (out, softmax_lse)
    return func


def qkv(dtype, b=2, s=24, h=3, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=gen).to(dtype) for _ in range(3)]


def test_fa3_op_uses_sdpa_when_a_mask_is_given_and_bf16_kernels_inside_fp16():
    calls = []
    op = attention.make_fa3(fake_fa3(calls), (torch.bfloat16,))
    q, k, v = qkv(torch.float16)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., 20:] = False
    masked = op(q.float(), k.float(), v.float(), mask)
    assert calls == []  # a key mask: no FA3 call (it takes none)
    assert torch.allclose(masked, attention.sdpa_attention(q.float(), k.float(), v.float(), mask))
    out = op(q, k, v, None)
    assert calls == [(torch.bfloat16, None)] and out.dtype == torch.float16
    assert rel(out, attention.sdpa_attention(q.float(), k.float(), v.float(), None)) < 1e-2


def test_fp16_output_of_bf16_kernels_stays_finite_at_the_edge_of_fp16():
    # v at fp16's largest value: bf16 rounds 65504 up to 65536, which the fp16 cast would make inf.
    calls = []
    op = attention.make_fa3(fake_fa3(calls), (torch.bfloat16,))
    q, k, _ = qkv(torch.float16)
    v = torch.full_like(q, 65504.0)
    out = op(q, k, v, None)
    assert torch.isfinite(out).all() and out.max().item() == 65504.0


def test_fa3_fp8_op_quantises_per_item_and_head():
    calls = []
    op = attention.make_fa3_fp8(fake_fa3(calls))
    q, k, v = qkv(torch.bfloat16)
    v[1] *= 50  # items with very different ranges: one scale each
    out = op(q, k, v, None)
    assert calls == [(torch.float8_e4m3fn, (2, 3))]
    assert out.dtype == torch.bfloat16
    assert rel(out, attention.sdpa_attention(q.float(), k.float(), v.float(), None)) < 0.08  # e4m3: 3 mantissa bits
    # the static-scale entry (q, k already e4m3 from the fused kernel): same maths
    qs, ks = 0.05, 0.04
    q8 = (q.float() / qs).clamp(-448, 448).to(torch.float8_e4m3fn)
    k8 = (k.float() / ks).clamp(-448, 448).to(torch.float8_e4m3fn)
    out2 = op.fp8_qk(q8, qs, k8, ks, v, torch.bfloat16)
    assert rel(out2, attention.sdpa_attention(q.float(), k.float(), v.float(), None)) < 0.08


def test_denoiser_backend_switch_sets_every_block_and_tiny_model_is_unchanged_with_sdpa():
    tr = make_tiny_components(seed=5)["transformer"]
    den = StaticZImageDenoiser(tr)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 16, 16, generator=gen), torch.tensor([0.4])
    cap, lens = torch.randn(1, 32, 32, generator=gen), torch.tensor([32])
    with torch.no_grad():
        before = den(x, t, cap, lens)
        den.set_attention_backend("sdpa")
        after = den(x, t, cap, lens)
    assert den.attention_backend == "sdpa"
    assert all(b.attention_op is attention.sdpa_attention for _, b in den.named_blocks())
    assert torch.equal(before, after)  # the same op on the same tensors
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_attention_backend("cudnn", "cpu")


def test_describe_names_the_kernel(monkeypatch):
    monkeypatch.setattr(attention, "find_fa3", lambda: ("fa3_fwd_interface", None, (torch.bfloat16,)))
    assert "in bf16 inside this torch.float16 model" in attention.describe("fa3", torch.float16)
    assert "FP8" in attention.describe("fa3-fp8", torch.bfloat16)
    assert "SDPA" in attention.describe("sdpa", torch.float16)


# -- GPU -------------------------------------------------------------------------------------------
def needs_fa3():
    # (the reason is what conftest.GPU_MACHINE_SKIPS reads: FA3 not installed, or not a Hopper GPU)
    reason = attention.fa3_unavailable_reason(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA GPU"
    if reason:
        pytest.skip(f"FlashAttention-3 cannot run here: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa3_matches_sdpa_at_full_size_shapes(dtype):
    needs_fa3()
    q, k, v = (torch.randn(1, 4256, 30, 128, device="cuda", dtype=dtype) for _ in range(3))
    ref = attention.sdpa_attention(q.float(), k.float(), v.float(), None)
    assert rel(attention.attention_op("fa3")(q, k, v, None), ref) < 5e-3
    assert rel(attention.attention_op("fa3-fp8")(q, k, v, None), ref) < 8e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa3", "fa3-fp8"])
@pytest.mark.parametrize("fused", [False, True])
def test_tiny_denoiser_with_each_backend_tracks_sdpa(backend, fused):
    needs_fa3()
    tr = make_tiny_transformer(seed=5, **FP8_GPU_TINY).to("cuda", torch.bfloat16)
    den = StaticZImageDenoiser(tr)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 32, 32, generator=gen).cuda(), torch.tensor([0.4], device="cuda")
    cap, lens = torch.randn(1, 64, 32, generator=gen).cuda().bfloat16(), torch.tensor([64], device="cuda")
    with torch.no_grad():
        ref = den(x, t, cap, lens, mask_caption_keys=False)
        den.set_attention_backend(backend)
        den.set_fused_kernels(fused)
        got = den(x, t, cap, lens, mask_caption_keys=False)
        masked = den(x, t, cap, lens - 7, mask_caption_keys=True)  # unequal caption: SDPA fallback runs
    assert torch.isfinite(masked).all()
    assert rel(got, ref) < (2e-2 if backend == "fa3" else 1e-1)
