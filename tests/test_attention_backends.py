"""The attention-backend switch (model/attention.py): resolution, fallbacks and what each op computes.

CPU: the switch's decisions and the fallback maths. GPU (gpu-marked): FA3 16-bit and FP8 against SDPA on
the full-size attention shapes, and a whole tiny denoiser with each backend against SDPA.
"""


import pytest
import torch

from zimage_trt.model import attention
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.fp8 import FP8_MAX
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


def fake_fa3(calls, seen=None):
    """A stand-in with FA3's signature computing exact attention, recording the dtypes it was given (and in
    `seen`, every argument: the e4m3 tensors and their descales)."""
    def func(q, k, v, q_descale=None, k_descale=None, v_descale=None):
        calls.append((q.dtype, None if q_descale is None else tuple(q_descale.shape)))
        if seen is not None:
            seen.append((q, k, v, q_descale, k_descale, v_descale))
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


def ranged_qkv(dtype, factor=1e6, b=2, s=24, h=3, d=16):
    """q, k, v whose ranges one e4m3 scale cannot cover: item 0's head 1 has q and v `factor` times larger
    and k `factor` times smaller than the other heads (its logits q.k unchanged), item 1's v is 50x item 0's.
    e4m3 spans 2^-9..448, a ratio of 2.3e5: with one scale for all heads a 1e6 louder head flushes the others
    to zero (a 1e4 one only coarsens them, which the output check alone would not tell from e4m3's own
    error); no scaling saturates the loud head."""
    return apply_ranges(*qkv(dtype, b, s, h, d), factor=factor)


def apply_ranges(q, k, v, factor):
    q[0, :, 1] *= factor
    k[0, :, 1] /= factor
    v[0, :, 1] *= factor
    v[1] *= 50
    return q, k, v


def amax_descale(x, dims=(1, 3)):
    """What a per-(item, head) e4m3 quantisation must use: the amax over `dims` onto e4m3's largest value."""
    return x.float().abs().amax(dim=dims) / FP8_MAX


def rel_per(a, b, dims=(1, 3)):
    """Relative error of each item and head (dims reduced): a check that one loud head cannot hide the rest."""
    return (a.float() - b.float()).square().sum(dims).sqrt() / b.float().square().sum(dims).sqrt()


def test_fa3_fp8_op_quantises_per_item_and_head():
    calls, seen = [], []
    op = attention.make_fa3_fp8(fake_fa3(calls, seen))
    q, k, v = ranged_qkv(torch.bfloat16)
    out = op(q, k, v, None)
    assert calls == [(torch.float8_e4m3fn, (2, 3))]
    assert out.dtype == torch.bfloat16
    [(q8, k8, v8, q_descale, k_descale, v_descale)] = seen
    for x, x8, descale in ((q, q8, q_descale), (k, k8, k_descale), (v, v8, v_descale)):
        assert torch.equal(descale, amax_descale(x))  # exact: the same max and one IEEE division
        # each item's and head's own largest value lands on e4m3's largest code (a shared scale would not)
        assert torch.equal(x8.float().abs().amax(dim=(1, 3)), torch.full((2, 3), FP8_MAX))
    errors = rel_per(out, attention.sdpa_attention(q.float(), k.float(), v.float(), None))
    assert errors.max() < 0.08, errors  # e4m3: 3 mantissa bits, in every item and head
    # the static-scale entry (q, k already e4m3 from the fused kernel, one scale each): v gets one scale per
    # item, so here item 1's v is 1e6 times item 0's (one shared scale would flush item 0 to zero)
    q, k, v = qkv(torch.bfloat16)
    v[1] *= 1e6
    qs, ks = 0.05, 0.04
    q8 = (q.float() / qs).clamp(-448, 448).to(torch.float8_e4m3fn)
    k8 = (k.float() / ks).clamp(-448, 448).to(torch.float8_e4m3fn)
    seen.clear()
    out2 = op.fp8_qk(q8, qs, k8, ks, v, torch.bfloat16)
    [(_, _, v8, q_descale, k_descale, v_descale)] = seen
    assert torch.equal(q_descale, torch.full((2, 3), qs)) and torch.equal(k_descale, torch.full((2, 3), ks))
    assert torch.equal(v_descale, amax_descale(v, (1, 2, 3))[:, None].expand(2, 3))
    assert torch.equal(v8.float().abs().amax(dim=(1, 2, 3)), torch.full((2,), FP8_MAX))
    errors = rel_per(out2, attention.sdpa_attention(q.float(), k.float(), v.float(), None), (1, 2, 3))
    assert errors.max() < 0.08, errors


def test_denoiser_backend_switch_sets_every_block_and_the_new_op_runs(monkeypatch):
    """sdpa -> a stand-in FA3 (exact attention, recording its calls) -> its FP8 op -> sdpa: every block's op
    changes each time, the stand-in runs once a block per forward, and the output tracks SDPA's."""
    calls = []
    monkeypatch.setattr(attention, "find_fa3", lambda: ("fake_fa3", fake_fa3(calls), (torch.float32,)))
    tr = make_tiny_components(seed=5)["transformer"]
    den = StaticZImageDenoiser(tr)
    blocks = [b for _, b in den.named_blocks()]
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 16, 16, generator=gen), torch.tensor([0.4])
    cap, lens = torch.randn(1, 32, 32, generator=gen), torch.tensor([32])
    run = lambda: den(x, t, cap, lens, mask_caption_keys=False)  # noqa: E731  (no key mask: FA3 takes none)
    with torch.no_grad():
        before = run()
        assert calls == [] and all(b.attention_op is attention.sdpa_attention for b in blocks)
        den.set_attention_backend("fa3")
        assert den.attention_backend == "fa3"
        ops = {id(b.attention_op) for b in blocks}
        assert len(ops) == 1 and all(b.attention_op is not attention.sdpa_attention for b in blocks)
        fa3 = run()
        assert calls == [(torch.float32, None)] * len(blocks)  # every block ran the new op
        den.set_attention_backend("fa3-fp8")
        assert all(isinstance(b.attention_op, attention.Fa3E4m3Attention) for b in blocks)
        calls.clear()
        fp8 = run()
        assert calls == [(torch.float8_e4m3fn, (1, 2))] * len(blocks)
        den.set_attention_backend("sdpa")
        assert all(b.attention_op is attention.sdpa_attention for b in blocks)
        calls.clear()
        after = run()
    assert calls == [] and torch.equal(before, after)  # the same op on the same tensors
    assert rel(fa3, before) < 1e-5  # exact attention by the stand-in (SDPA again): only call order may differ
    assert 0 < rel(fp8, before) < 0.1  # e4m3 inputs: a few percent
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
    # FP8 through the real kernel on ranges one e4m3 scale cannot cover (ranged_qkv), its descales recorded on
    # the way in. fp16 cannot hold a normal draw x 1e6 (65504), so there the loud head is x 1e4: a shared
    # scale then only coarsens the others, and it is the recorded descales that tell it apart.
    real, seen = attention.find_fa3()[1], []
    op = attention.make_fa3_fp8(lambda q8, k8, v8, **descales: seen.append(descales) or real(q8, k8, v8, **descales))
    q, k, v = apply_ranges(*(torch.randn(2, 4256, 30, 128, device="cuda", dtype=dtype) for _ in range(3)),
                           factor=1e6 if dtype == torch.bfloat16 else 1e4)
    out = op(q, k, v, None)
    [descales] = seen
    for x, name in ((q, "q_descale"), (k, "k_descale"), (v, "v_descale")):
        assert torch.equal(descales[name], amax_descale(x)), name  # the same max and one IEEE division
    errors = rel_per(out, attention.sdpa_attention(q.float(), k.float(), v.float(), None))
    assert torch.isfinite(out).all() and errors.max() < 8e-2, errors  # every item and head, as one head alone


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
