"""Speed II probe (issue 10), one GPU, one process: attention kernels alone, a compiled denoiser step per
attention backend and precision, and where a step's time goes (torch.profiler kernel totals by kind).

    python bench/speed2_probe.py [--parts attn,step,profile] [--json out.json]

Speed III (issue 21) parts: `epilogue` (the FP8 epilogue switch, model/fp8_gemm.py: the w1|w3 GEMM with
SiLU gate + row amax against two cuBLAS products + the SiLU/quantisation kernel, alone; one FP8 block
and one FP8 step, compiled and graphed, with the switch off and on) and `text` (the FP8 text encoder's
per-token quantisation kernel off and on, against the bf16 encoder). Run alone (`--parts epilogue,text`)
they are one phased job (benchmark/phased.py): everything is compiled before anything is timed.
A step variant's trailing `:epilogues` turns the switch on in the `step` part too.

Shapes: 1024x1024 (4096 image tokens + a 160-token caption padded to 160 = 4256), 30 heads x 128.
"""

import argparse
import json
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from zimage_trt.benchmark.common import cuda_time_ms, full_size_text_encoder, full_size_transformer, graphed
from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine
from zimage_trt.model import attention
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.runtime.telemetry import summarize

CATEGORIES = (
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|cublas|scaled_mm", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attn|attention", re.I)),
    ("inductor (element-wise/norm)", re.compile(r"^triton_", re.I)),
)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attn_part(results):
    torch.manual_seed(0)
    B, S, H, D = 1, 4256, 30, 128
    flops = 4 * B * H * S * S * D
    found = {}
    for name, _ in attention.FA3_MODULES:
        try:
            mod = __import__(name)
            found[name] = mod.flash_attn_func
        except Exception as exc:  # report what did not import
            print(f"{name}: does not import ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
    rows = {}
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
        cands = {"sdpa": lambda: attention.sdpa_attention(q, k, v, None)}
        for name, func in found.items():
            op16 = attention.make_fa3(func, dict(attention.FA3_MODULES)[name])
            op8 = attention.make_fa3_fp8(func)
            cands[f"{name}"] = (lambda op=op16: op(q, k, v, None))
            cands[f"{name} fp8 (with quantisation)"] = (lambda op=op8: op(q, k, v, None))
            q8, qs = attention.quantize_heads_fp8(q)
            k8, ks = attention.quantize_heads_fp8(k)
            v8, vs = attention.quantize_heads_fp8(v)
            cands[f"{name} fp8 kernel only"] = (lambda f=func, q8=q8, k8=k8, v8=v8, qs=qs, ks=ks, vs=vs:
                                                attention._first(f(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)))
        for cname, fn in cands.items():
            try:
                with torch.no_grad():
                    out = fn()
                    err = rel(out, ref)
                    ms = summarize(cuda_time_ms(fn, warmup=5, iters=50))["p50"]
                rows[f"{dtype} {cname}"] = dict(ms=ms, tflops=flops / ms / 1e9, rel_err=err)
                print(f"attn {str(dtype):<15} {cname:<36} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  rel err {err:.1e}",
                      flush=True)
            except Exception as exc:
                print(f"attn {dtype} {cname}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    results["attention_kernels"] = rows


def kernel_table(prof, steps=1):
    totals, names = {}, {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not t or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cat = next((c for c, rx in CATEGORIES if rx.search(evt.key)), "other")
        totals[cat] = totals.get(cat, 0.0) + t / 1e3 / steps
        names[evt.key] = (cat, t / 1e3 / steps, evt.count // steps)
    return totals, names


def step_part(results, variants, do_profile, caption=160):
    torch._dynamo.config.cache_size_limit = 64
    out = {}
    x = torch.randn(1, 16, 128, 128, device="cuda")
    t = torch.tensor([0.5], device="cuda")
    lens = torch.tensor([caption], device="cuda")
    models = {}
    refs = {}
    for variant in variants:
        precision, backend, *flags = variant.split(":")
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        key = precision
        if key not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[key] = full_size_transformer("cuda", dtype)
            if precision == "fp8":
                # a 16-bit reference on the same weights, taken before quantisation
                den16 = StaticZImageDenoiser(models[key])
                den16.set_attention_backend("sdpa")
                cap = torch.randn(1, caption, 2560, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(1))
                with torch.no_grad():
                    refs["bf16-eager"] = den16(x, t, cap, lens, mask_caption_keys=False).clone()
                del den16
        model = models[key]
        cap = torch.randn(1, caption, 2560, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(1))
        torch._dynamo.reset()
        den = StaticZImageDenoiser(model)
        if precision == "fp8" and not getattr(model, "_q", False):
            den.quantize_fp8()
            model._q = True
        den.set_attention_backend(backend)
        den.set_fused_kernels("fused" in flags or "fused-qk" in flags, residual_norms="fused-qk" not in flags,
                              fp8_epilogues="epilogues" in flags)
        start = time.perf_counter()
        engine = CompiledDenoiserEngine(den)
        run = lambda: engine.run(x, t, cap, lens, masked=False)  # noqa: E731
        try:
            with torch.no_grad():
                o = run().clone()
                compile_s = time.perf_counter() - start
                base = refs.setdefault(precision, o)
                g = graphed(run)
                stats = summarize(cuda_time_ms(g.replay, warmup=3, iters=20))
                row = dict(step_ms=stats["p50"], cv=stats["cv"], rel_vs_sdpa=rel(o, base), compile_s=compile_s)
                if "bf16-eager" in refs and precision == "fp8":
                    row["rel_vs_bf16"] = rel(o, refs["bf16-eager"])
                print(f"step {variant:<16} p50 {stats['p50']:7.2f} ms  cv {100 * stats['cv']:.2f}%  rel vs first {row['rel_vs_sdpa']:.2e}"
                      + (f"  rel vs bf16 {row['rel_vs_bf16']:.3f}" if "rel_vs_bf16" in row else "")
                      + f"  (compile {compile_s:.0f}s)", flush=True)
                if do_profile and ("fused" in flags or "fused-qk" in flags or precision == "fp16"):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            g.replay()
                        torch.cuda.synchronize()
                    totals, names = kernel_table(prof, steps=3)
                    row["profile_ms"] = totals
                    print(f"  profile {variant}: " + "  ".join(f"{c} {v:.2f}" for c, v in sorted(totals.items(), key=lambda kv: -kv[1]))
                          + f"  sum {sum(totals.values()):.2f}", flush=True)
                    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:40]
                    row["top_kernels"] = [(n[:160], c, ms, cnt) for n, (c, ms, cnt) in top]
                    for n, (c, ms, cnt) in top[:22]:
                        print(f"    {ms:7.3f} ms  x{cnt:<4} {c[:9]:<9} {n[:110]}", flush=True)
                del g
        except Exception as exc:
            print(f"step {variant}: failed {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            row = dict(error=str(exc)[:500])
        out[variant] = row
        engine = den = None
    results["steps"] = out


def kernels_part(results):
    """Parity and speed of each fused Triton kernel against the unfused torch maths (compiled)."""
    from zimage_trt.model import fused_kernels
    from zimage_trt.model.denoiser import apply_rope, rms_norm

    out = {}
    B, S, H, D = 1, 4256, 30, 128
    for dtype in (torch.float16, torch.bfloat16):
        norm = torch.nn.RMSNorm(D, eps=1e-5, device="cuda", dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(D, device="cuda"))
        x = torch.randn(B, S, H, D, device="cuda", dtype=dtype) * 3
        ang = torch.rand(B, S, 1, D // 2, device="cuda") * 6.28
        cos, sin = ang.cos(), ang.sin()
        unfused = torch.compile(lambda x: apply_rope(rms_norm(norm, x), cos, sin), fullgraph=True)
        fused = lambda x: fused_kernels.qk_norm_rope(x, norm.weight, norm.eps, cos, sin)  # noqa: E731
        with torch.no_grad():
            ref = apply_rope(rms_norm(norm, x), cos, sin)
            got = fused(x)
            e = rel(got, ref)
            maxulp = (got.float() - ref.float()).abs().max().item()
            t_ref = summarize(cuda_time_ms(lambda: unfused(x), warmup=5, iters=50))["p50"]
            t_got = summarize(cuda_time_ms(lambda: fused(x), warmup=5, iters=50))["p50"]
            scale = (D ** 0.5) * norm.weight.abs().max().item() * 1.01 / 448
            q8 = fused_kernels.quantize_static_fp8(fused_kernels.qk_norm_rope(x, norm.weight, norm.eps, cos, sin), scale)
            e8 = rel(q8.float() * scale, ref)
        out[f"qk_norm_rope {dtype}"] = dict(rel=e, max_abs=maxulp, ms_compiled_torch=t_ref, ms_triton=t_got, fp8_rel=e8)
        print(f"kernel qk_norm_rope {dtype}: rel {e:.1e} max|d| {maxulp:.1e}  compiled torch {t_ref:.3f} ms  triton {t_got:.3f} ms"
              f"  (fp8 out rel {e8:.1e})", flush=True)
    from zimage_trt.model.fp8 import FP8_MAX
    a = torch.randn(4256, 10240, device="cuda", dtype=torch.bfloat16) * 2
    b = torch.randn_like(a)

    def unfused_sq(a, b):
        rows = torch.nn.functional.silu(a) * b
        s = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        return (rows.float() / s).to(torch.float8_e4m3fn), s

    cu = torch.compile(unfused_sq, fullgraph=True)
    with torch.no_grad():
        rq, rs = unfused_sq(a, b)
        gq, gs = fused_kernels.silu_mul_quant_fp8(a, b)
        e = rel(gq.float() * gs, rq.float() * rs)
        mism = (gq.float() != rq.float()).float().mean().item()
        t_ref = summarize(cuda_time_ms(lambda: cu(a, b), warmup=5, iters=50))["p50"]
        t_got = summarize(cuda_time_ms(lambda: fused_kernels.silu_mul_quant_fp8(a, b), warmup=5, iters=50))["p50"]
    out["silu_mul_quant"] = dict(rel=e, mismatch=mism, ms_compiled_torch=t_ref, ms_triton=t_got)
    print(f"kernel silu_mul_quant: rel {e:.1e} fp8 codes differing {mism:.1e}  compiled torch {t_ref:.3f} ms  triton {t_got:.3f} ms",
          flush=True)
    n = 3840
    for dtype, quant in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)):
        x = torch.randn(1, 4256, n, device="cuda").to(dtype) * 3
        y = torch.randn(1, 4256, n, device="cuda").to(dtype) * 40
        post, nxt = (torch.nn.RMSNorm(n, eps=1e-5, device="cuda", dtype=dtype) for _ in range(2))
        gate = torch.randn(1, 1, n, device="cuda").tanh().to(dtype)
        mod = (1 + 0.2 * torch.randn(1, 1, n, device="cuda")).to(dtype)

        def unfused_rn(x, y, quant=quant):
            x = x + gate * rms_norm(post, y)
            h = rms_norm(nxt, x) * mod
            if quant:
                rows = h.reshape(-1, n)
                s = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
                return x, (rows.float() / s).to(torch.float8_e4m3fn), s
            return x, h

        def fused_rn(x, y, quant=quant):
            return fused_kernels.residual_norm(x, y, post.weight, post.eps, gate[:, 0], nxt.weight, nxt.eps,
                                               mod[:, 0], quant=quant)

        cu = torch.compile(unfused_rn, fullgraph=True)
        with torch.no_grad():
            ref = unfused_rn(x, y)
            got = fused_rn(x, y)
            e = rel(got[0], ref[0])
            t_ref = summarize(cuda_time_ms(lambda: cu(x, y), warmup=5, iters=50))["p50"]
            t_got = summarize(cuda_time_ms(lambda: fused_rn(x, y), warmup=5, iters=50))["p50"]
        key = f"residual_norm {dtype}{' +fp8' if quant else ''}"
        out[key] = dict(rel_x=e, ms_compiled_torch=t_ref, ms_triton=t_got)
        print(f"kernel {key}: rel x {e:.1e}  compiled torch {t_ref:.3f} ms  triton {t_got:.3f} ms", flush=True)
    v = torch.randn(1, 4256, 30, 128, device="cuda", dtype=torch.bfloat16)

    def unfused_v(v):
        amax = v.reshape(1, -1).abs().amax(dim=1).float().clamp(min=1e-12)
        s = amax / FP8_MAX
        return (v.float() / s[:, None, None, None]).to(torch.float8_e4m3fn), s

    cu = torch.compile(unfused_v, fullgraph=True)
    with torch.no_grad():
        t_ref = summarize(cuda_time_ms(lambda: cu(v), warmup=5, iters=50))["p50"]
        t_got = summarize(cuda_time_ms(lambda: fused_kernels.quantize_per_item_fp8(v), warmup=5, iters=50))["p50"]
    out["quantize_per_item"] = dict(ms_compiled_torch=t_ref, ms_triton=t_got)
    print(f"kernel quantize_per_item (v): compiled torch {t_ref:.3f} ms  triton {t_got:.3f} ms", flush=True)
    results["kernels"] = out


def policy_part(results, plant: bool):
    """FP8 sensitivity pass on the full-size model (random weights, optionally planted outliers), the
    auto keep list, and the deviation from bf16 and step time with and without it."""
    from zimage_trt.compiler.fp8_policy import choose_fp8_keep, fp8_sensitivity

    torch._dynamo.reset()
    model = full_size_transformer("cuda", torch.bfloat16)
    planted = []
    if plant:
        gen = torch.Generator("cuda").manual_seed(3)
        with torch.no_grad():
            for name in ("noise_refiner.1", "layers.7", "layers.22"):
                group, i = name.split(".")
                blk = getattr(model, group)[int(i)]
                ch = torch.randperm(blk.attention_norm1.weight.numel(), device="cuda", generator=gen)[:4]
                blk.attention_norm1.weight[ch] *= 1000
                blk.ffn_norm1.weight[ch] *= 1000
                rows = torch.randperm(blk.feed_forward.w1.weight.shape[0], device="cuda", generator=gen)[:8]
                blk.feed_forward.w1.weight[rows] *= 30
                blk.feed_forward.w3.weight[rows] *= 30
                planted.append(name)
    den = StaticZImageDenoiser(model)
    gen = torch.Generator("cuda").manual_seed(7)
    # calibration: 512x512 latents, two timesteps, a 160-token caption (small: the pass is 35 forwards)
    calib = (torch.randn(2, 16, 64, 64, device="cuda", generator=gen), torch.tensor([0.25, 0.75], device="cuda"),
             torch.randn(2, 160, 2560, device="cuda", dtype=torch.bfloat16, generator=gen), torch.tensor([160, 160], device="cuda"))
    start = time.perf_counter()
    sens = fp8_sensitivity(den, calib)
    pass_s = time.perf_counter() - start
    keep = choose_fp8_keep("auto", sens, [n for n, _ in den.named_blocks()])
    top = sorted(sens.items(), key=lambda kv: -kv[1])[:6]
    print(f"policy plant={plant}: sensitivity pass {pass_s:.1f}s; planted {planted}; auto keeps {keep}; "
          f"top {[(n, round(v, 4)) for n, v in top]}; median {sorted(sens.values())[len(sens) // 2]:.4f}", flush=True)
    x = torch.randn(1, 16, 128, 128, device="cuda", generator=gen)
    t = torch.tensor([0.5], device="cuda")
    cap = torch.randn(1, 160, 2560, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.tensor([160], device="cuda")
    with torch.no_grad():
        ref = den(x, t, cap, lens, mask_caption_keys=False).clone()
    row = dict(planted=planted, keep=keep, sensitivity=sens, pass_s=pass_s)
    import copy
    for label, kept in (("all fp8", []), ("policy", keep)):
        if label == "policy" and not kept:
            continue
        m = copy.deepcopy(model)
        d = StaticZImageDenoiser(m)
        d.quantize_fp8(keep=kept)
        d.set_attention_backend("fa3" if attention.find_fa3() else "sdpa")
        d.set_fused_kernels(True)
        torch._dynamo.reset()
        engine = CompiledDenoiserEngine(d)
        with torch.no_grad():
            o = engine.run(x, t, cap, lens, masked=False).clone()
            g = graphed(lambda: engine.run(x, t, cap, lens, masked=False))
            ms = summarize(cuda_time_ms(g.replay, warmup=3, iters=20))["p50"]
        row[label] = dict(rel_vs_bf16=rel(o, ref), step_ms=ms)
        print(f"  {label:<8} keep {len(kept)} blocks: rel vs bf16 {rel(o, ref):.4f}  step {ms:.2f} ms", flush=True)
        g = engine = d = m = None
        torch.cuda.empty_cache()
    results[f"policy_plant_{plant}"] = row


# -- Speed III: the FP8 epilogue switch and the FP8 text encoder's kernel --------------------------------
def epilogue_prepare(caption=160):
    """Everything compiled and captured first: the kernels alone, one FP8 block, one FP8 step, each with
    the epilogue switch off and on; returns the graphs to time and the outputs to compare."""
    from zimage_trt.model import fp8_gemm, fused_kernels
    from zimage_trt.model.fp8 import Fp8Linear

    torch._dynamo.config.cache_size_limit = 64
    timed, notes = {}, {}
    # kernels alone at Z-Image's feed-forward shape (4256 tokens, 3840 -> 10240 -> 3840)
    m, k, n = 4096 + caption, 3840, 10240
    w1, w3 = (Fp8Linear(torch.nn.Linear(k, n, bias=False, device="cuda").to(torch.bfloat16)) for _ in range(2))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    x8, xs = fused_kernels.quantize_rows_fp8(x)
    with torch.no_grad():
        def unfused():
            return fused_kernels.silu_mul_quant_fp8(w1.forward_quantised(x8, xs, (m,)), w3.forward_quantised(x8, xs, (m,)))

        def fused():
            return fp8_gemm.swiglu_fp8(x8, xs, w1, w3)

        ref_q, ref_s = unfused()
        got_q, got_s = fused()
        notes["swiglu_rel_vs_unfused"] = rel(got_q.float() * got_s, ref_q.float() * ref_s)
        timed["kernel: w1 + w3 (cuBLAS) + silu_mul_quant"] = unfused
        timed["kernel: swiglu_fp8 (ours, default tile) + quantise pass"] = fused
        wide = dict(fp8_gemm.TILE, BLOCK_N=128, num_stages=3)  # the 128 x 256 joint tile (255 registers)

        def fused_wide(default=dict(fp8_gemm.TILE)):
            fp8_gemm.TILE.update(wide)
            try:
                return fp8_gemm.swiglu_fp8(x8, xs, w1, w3)
            finally:
                fp8_gemm.TILE.update(default)

        wide_q, wide_s = fused_wide()
        notes["swiglu_wide_tile_rel_vs_unfused"] = rel(wide_q.float() * wide_s, ref_q.float() * ref_s)
        timed["kernel: swiglu_fp8 (ours, 128 x 2x128 tile) + quantise pass"] = fused_wide

        def torch_rows():
            rows = x.reshape(-1, k)
            scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
            return (rows.float() / scale).to(torch.float8_e4m3fn), scale

        timed["kernel: per-token quantisation, torch ops [4256, 3840]"] = torch_rows
        timed["kernel: per-token quantisation, quantize_rows_fp8"] = lambda: fused_kernels.quantize_rows_fp8(x)
    # one block and one step of the full-size FP8 model
    model = full_size_transformer("cuda", torch.bfloat16)
    den = StaticZImageDenoiser(model)
    den.quantize_fp8()
    den.set_attention_backend(attention.resolve_attention_backend("auto", "cuda", precision="fp8"))
    lat = torch.randn(1, 16, 128, 128, device="cuda")
    t = torch.tensor([0.5], device="cuda")
    cap = torch.randn(1, caption, 2560, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))
    lens = torch.tensor([caption], device="cuda")
    block = den.layers[0]
    captured = {}
    def keep_inputs(module, call_args, call_kwargs):
        captured.setdefault("call", (call_args, call_kwargs))  # (returns None: the call goes on unchanged)

    handle = block.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    with torch.no_grad():
        den.set_fused_kernels(True, fp8_epilogues=False)
        den(lat, t, cap, lens, mask_caption_keys=False)
    handle.remove()
    b_args, b_kwargs = captured["call"]
    outputs = {}
    engine = CompiledDenoiserEngine(den)  # blocks compiled in place; flipping the switch recompiles them
    for on in (False, True):  # (dynamo guards the blocks' flag: both versions stay cached, both graphs valid)
        den.set_fused_kernels(True, fp8_epilogues=on)
        label = "on" if on else "off"
        start = time.perf_counter()
        with torch.no_grad():
            block_graph = graphed(lambda: block(*b_args, **b_kwargs))
            step_graph = graphed(lambda: engine.run(lat, t, cap, lens, masked=False))
            step_graph.replay()
            torch.cuda.synchronize()
            outputs[label] = step_graph.output.clone()
        notes[f"compile_s_epilogues_{label}"] = time.perf_counter() - start
        timed[f"block layers.0, epilogues {label}"] = block_graph.replay
        timed[f"step, epilogues {label}"] = step_graph.replay
        print(f"epilogues {label}: compiled and captured in {notes[f'compile_s_epilogues_{label}']:.0f} s", flush=True)
    notes["step_rel_on_vs_off"] = rel(outputs["on"], outputs["off"])
    return {"timed": timed, "notes": notes, "keep": (model, den, w1, w3, x)}


def text_prepare():
    """The FP8 text encoder with the per-token kernel off and on, and the bf16 encoder, each with its graphs captured."""
    from zimage_trt.benchmark.common import PROMPT_160
    from zimage_trt.model.fp8 import quantize_text_encoder_fp8
    from zimage_trt.runtime.placement import use_text_encoder_fp8_kernel
    from zimage_trt.runtime.text_encoder import PromptEncoder
    from zimage_trt.testing.tiny import make_tiny_tokenizer

    cuda = torch.device("cuda")
    tokenizer = make_tiny_tokenizer()
    timed, notes, features = {}, {}, {}
    bf16 = full_size_text_encoder("cuda")
    fp8 = full_size_text_encoder("cuda")
    quantize_text_encoder_fp8(fp8)
    prompts = {"178 tokens (bench prompt)": PROMPT_160, "40 tokens": "a red fox in the snow"}
    settings = [("bf16", bf16, None), ("fp8 kernel off", fp8, False), ("fp8 kernel on", fp8, True)]
    for name, te, kernel in settings:
        if kernel is not None:
            use_text_encoder_fp8_kernel(te, kernel, cuda)
        encoder = PromptEncoder(te, tokenizer, cuda)  # (new graphs: captured with this setting's kernels)
        with torch.no_grad():
            for label, prompt in prompts.items():
                features[(name, label)] = encoder.encode([prompt], 512)[0].clone()
                timed[f"text {name}, {label}"] = (lambda e=encoder, p=prompt: e.encode([p], 512))
    for label in prompts:
        notes[f"text fp8 on vs off rel, {label}"] = rel(features[("fp8 kernel on", label)], features[("fp8 kernel off", label)])
    return {"timed": timed, "notes": notes, "keep": (bf16, fp8)}


def speed3_measure(state, iters=20) -> dict:
    results = {"notes": state["notes"], "ms": {}}
    with torch.no_grad():
        for name, fn in state["timed"].items():
            if name.startswith("text "):  # host work in it (tokenizer, copies): wall time, synced
                times = []
                for _ in range(iters + 3):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
                stats = summarize(times[3:])
            else:
                stats = summarize(cuda_time_ms(fn, warmup=3, iters=iters))
            results["ms"][name] = stats
            print(f"{name:<58} p50 {stats['p50']:8.3f} ms  mean {stats['mean']:8.3f}  cv {100 * stats['cv']:5.2f}%",
                  flush=True)
    for name, value in state["notes"].items():
        print(f"  {name}: {value:.4g}", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", default="attn,step", help="which parts to run")
    ap.add_argument("--variants", default="fp16:sdpa,fp16:fa3,fp16:fa3:fused,fp16:fa3-fp8:fused,bf16:fa3:fused,"
                    "fp8:fa3,fp8:fa3:fused,fp8:fa3-fp8:fused",
                    help="precision:attention-backend pairs for the step part")
    ap.add_argument("--profile", action="store_true", help="kernel totals for each step variant")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = args.parts.split(",")
    if set(parts) <= {"epilogue", "text"}:  # Speed III: one phased job, compile first, then time
        from zimage_trt.benchmark import phased

        def prepare():
            states = [part() for name, part in (("epilogue", epilogue_prepare), ("text", text_prepare)) if name in parts]
            return {"timed": {k: v for st in states for k, v in st["timed"].items()},
                    "notes": {k: v for st in states for k, v in st["notes"].items()}, "keep": [st["keep"] for st in states]}

        def measure(state):
            out = {**results, **speed3_measure(state)}
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1, default=str)
            return out

        return phased.run_worker(prepare, measure)
    if "kernels" in parts:
        kernels_part(results)
    if "attn" in parts:
        attn_part(results)
    if "step" in parts:
        step_part(results, args.variants.split(","), args.profile)
    for plant in [p for p in (False, True) if f"policy{'-plant' if p else ''}" in parts]:
        policy_part(results, plant)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    raise SystemExit(main())
