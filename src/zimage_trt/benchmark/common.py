"""Benchmarks: full-size Z-Image-Turbo architecture with random weights, our engines against the
diffusers peers, in one process on one GPU. The speed of the maths does not depend on the values, so
random weights (which we can make here, unlike the real ones) measure the real thing.

Peers: diffusers eager (bf16) and diffusers with `compile_repeated_blocks(fullgraph=True)` (plus a
compiled VAE decoder at the pipeline level). Timings use CUDA events after warm-up; statistics are
mean, std, p50, p95 and the coefficient of variation.
"""

from __future__ import annotations

import gc
import time

import torch
from torch import nn

from ..compiler.build import build_engines
from ..model.precision import precision_dtype
from ..pipeline import ZImageTRTPipeline
from ..testing.tiny import ZIMAGE_TURBO_SCHEDULER_CONFIG, make_tiny_components, make_tiny_tokenizer

# Z-Image-Turbo's text encoder is Qwen3-4B; its VAE is the 16-channel Flux VAE.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
# A prompt that the tiny byte-level tokenizer turns into ~160 tokens with the chat template.
PROMPT_160 = ("A red fox standing in fresh snow at dawn, soft golden light, shallow depth of field, "
              "mist over a frozen river, pine trees, highly detailed fur, 85mm photograph")


@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """A finite bf16-friendly init: normal(0, 0.02) matrices, 1 for norm weights, 0 for biases."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and ("norm" in name or name.endswith("weight")):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for name, b in module.named_buffers():
        if b.is_floating_point() and "norm" in name:
            b.fill_(1.0)
    return module


def _materialise(cls_factory, device, dtype, seed):
    # Cast on the meta device, then allocate: the weights are made in their final dtype, with no fp32
    # copy passing through the GPU (which left the allocator's cache fragmented and the measured
    # reserved memory ~6 GiB above what loading from disk gives).
    with torch.device("meta"):
        module = nn.Module.to(cls_factory(), dtype)
    module = module.to_empty(device=device)
    random_init_(module, seed)
    return module.eval().requires_grad_(False)


def full_size_transformer(device="cuda", dtype=torch.bfloat16, seed=0):
    from diffusers import ZImageTransformer2DModel

    return _materialise(ZImageTransformer2DModel, device, dtype, seed)


def full_size_vae(device="cuda", dtype=torch.bfloat16, seed=1):
    from diffusers import AutoencoderKL

    return _materialise(lambda: AutoencoderKL(**FLUX_VAE), device, dtype, seed)


def full_size_text_encoder(device="cuda", dtype=torch.bfloat16, seed=2):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**QWEN3_4B)
    model = _materialise(lambda: Qwen3Model(config), device, dtype, seed)
    # Rotary inverse frequencies are buffers computed at construction; on meta they were lost.
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            inv_freq, scaling = module.rope_init_fn(module.config, device)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq
            module.attention_scaling = scaling
    return model


def full_size_components(device="cuda", dtype=torch.bfloat16) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "transformer": full_size_transformer(device, dtype),
        "vae": full_size_vae(device, dtype),
        "text_encoder": full_size_text_encoder(device, dtype),
        "tokenizer": make_tiny_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER_CONFIG),
    }


def full_size_pipeline(device="cuda", precision: str = "fp16", engine_dir=None, build_sizes=None):
    """(the full-size random-weight pipeline, build seconds or None). With `build_sizes`, a torch-compiled
    engine for them (with the VAE decoder's kernels) is built into `engine_dir` first, from the same
    weights (the build copies the transformer); without an engine the eager static denoiser runs."""
    dtype = precision_dtype(precision)
    parts = full_size_components(device, dtype)
    build_s = None
    if build_sizes:
        started = time.perf_counter()
        build_engines(parts["transformer"], list(build_sizes), engine_dir, backend="torch-compiled",
                      precision=precision, caption_capacity=512, batch=1, progress=False, vae=parts["vae"])
        build_s = time.perf_counter() - started
        gc.collect()  # the build's copy of the transformer (its memory stays in torch's cache for the pipeline)
    # Eager: the VAE stays uncompiled too (compiling it from scratch takes ~20 s; an engine brings its kernels).
    pipe = ZImageTRTPipeline.from_components(**parts, engine_dir=engine_dir, device=device, torch_dtype=dtype,
                                             precision=precision, compile_vae=None if engine_dir else False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, build_s


def bench_components(tiny: bool, device, dtype) -> dict:
    """Full-size random components in `dtype` (the benchmark), or the tiny model in fp32 as made (a CPU
    smoke test of the scripts; pipelines cast it); the same weights in every process (seeded generators)."""
    if not tiny:
        return full_size_components(device, dtype)
    parts = make_tiny_components(seed=0)
    for key in ("transformer", "vae", "text_encoder"):
        parts[key] = parts[key].to(device)
    return parts


# -- logging -------------------------------------------------------------------------------------
class Log:
    """print() that also goes to a file, each line as it comes (flushed: a run killed by a timeout keeps
    its log). `log(*parts)` joins the parts with spaces, as print does; with `stamp`, each line starts
    with the seconds since `started` (default: when the log was opened), `[  12.3 s] `. `mode` "a"
    appends to an earlier run's file."""

    def __init__(self, path, *, stamp: bool = False, started: float | None = None, mode: str = "w"):
        self.stamp = stamp
        self.started = time.perf_counter() if started is None else started
        self._file = open(path, mode, buffering=1)

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        if self.stamp:
            line = f"[{time.perf_counter() - self.started:6.1f} s] " + line
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# -- timing --------------------------------------------------------------------------------------
def cuda_time_ms(fn, *, warmup: int = 3, iters: int = 10) -> list[float]:
    """Per-call milliseconds with CUDA events (one sync per call, after it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def timed_images(pipe, n: int, *, seed: int = 100, device=None, **call) -> tuple[list[float], object]:
    """Wall-clock ms of each of `n` calls `pipe(PROMPT_160, generator=<seed + i>, **call)`, each ended by
    a CUDA synchronise where CUDA is available; returns (the times, the last call's output). No warm-up
    here: callers run it once untimed first. The generators are on `device` (default: the pipeline's)."""
    device = pipe.device if device is None else device
    times, out = [], None
    for i in range(n):
        start = time.perf_counter()
        out = pipe(PROMPT_160, generator=torch.Generator(device).manual_seed(seed + i), **call)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times, out


def format_row(name: str, stats: dict, baseline: float | None = None) -> str:
    ratio = f"{baseline / stats['mean']:6.2f}x" if baseline else "      "
    return (f"{name:<44} mean {stats['mean']:8.2f}  std {stats['std']:6.2f}  p50 {stats['p50']:8.2f}  "
            f"p95 {stats['p95']:8.2f}  cv {100 * stats['cv']:5.2f}%  {ratio}")


def environment() -> dict:
    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML absent: the driver version is simply not reported
            pass
    return info


def graphed(fn):
    """`fn` captured in a CUDA graph after one warm-up run on a side stream; `.output` is its static result."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph.output = fn()
    return graph
