"""The image tasks' engine path on a GPU: the ControlNet and the inpaint blend inside the captured CUDA
graph of each step, through the eager and the torch-compiled engines, in bf16 and fp16, against the
eager loop without graphs (the reference; the CPU tests pin that one to diffusers).

Tolerances: a graph replays the kernels the eager step ran, so graphed vs not is within 1e-3 of the
largest value (the graph pool's other allocation only); Inductor fuses and orders the 16-bit arithmetic
differently, so compiled vs eager is a relative L2 within 3e-2 over four steps (bf16's 8-bit mantissa).
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_trt.engines.base import TorchDenoiserEngine
from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.runtime.denoise_loop import ControlInput, DenoiseLoop, InpaintBlend
from zimage_trt.testing.tiny import ZIMAGE_TURBO_SCHEDULER_CONFIG, make_tiny_controlnet, make_tiny_transformer

from test_runtime import sync_free_steps

pytestmark = pytest.mark.gpu
STEPS = 4


def relative_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(dtype, batch=2):
    gen = torch.Generator("cuda").manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), device="cuda")
    latents = torch.randn(batch, 16, 32, 32, generator=gen, device="cuda")
    embeds = [torch.randn(n, 32, generator=gen, device="cuda", dtype=dtype) for n in (20, 45)[:batch]]
    mask = (torch.rand(batch, 1, 32, 32, generator=gen, device="cuda") > 0.5).float()
    blend = InpaintBlend(mask, torch.randn(batch, 16, 32, 32, generator=gen, device="cuda"), latents.clone())
    context = torch.randn(batch, 33, 32, 32, generator=gen, device="cuda", dtype=dtype)
    return scheduler, latents, embeds, blend, context


def engine_of(kind, transformer):
    denoiser = StaticZImageDenoiser(transformer)
    return CompiledDenoiserEngine(denoiser) if kind == "torch-compiled" else TorchDenoiserEngine(denoiser)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["eager", "torch-compiled"])
def test_controlnet_and_blend_inside_the_step_graph_match_the_eager_reference(kind, dtype):
    transformer = make_tiny_transformer(seed=0, dtype=dtype).cuda()
    controlnet = make_tiny_controlnet(seed=1, variant="control_noise_refiner", control_in_dim=33, dtype=dtype).cuda()
    scheduler, latents, embeds, blend, context = inputs(dtype)
    scales = torch.tensor([0.75, 0.75, 0.75])
    control = ControlInput(controlnet, context, scales)
    run = dict(progress=False, blend=blend, control=control)
    reference = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cuda", use_cuda_graph=False)
    expected = reference(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, **run)
    plain = reference(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    loop = DenoiseLoop(engine_of(kind, transformer), "cuda")
    got = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, **run)
    assert torch.isfinite(got).all()
    (slot,) = loop._slots.values()
    assert slot.graph is not None and slot.control is not None and slot.blend is not None
    if kind == "eager":
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    else:
        assert relative_l2(got, expected) <= 3e-2
    assert relative_l2(plain, expected) > 0.1, "the ControlNet and the blend changed nothing"

    # Other scales: the same graph (no new capture), the new values read from the slot's buffers.
    graph = slot.graph
    other = ControlInput(controlnet, context, torch.tensor([0.0, 1.5, 0.25]))
    got_other = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False, blend=blend,
                     control=other)
    expected_other = reference(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False,
                               blend=blend, control=other)
    assert loop._slots[next(iter(loop._slots))].graph is graph and len(loop._slots) == 1
    assert relative_l2(got_other, expected_other) <= (1e-3 if kind == "eager" else 3e-2)
    assert relative_l2(got_other, got) > 1e-2


def test_no_host_sync_and_flat_memory_with_a_controlnet_and_a_blend():
    dtype = torch.bfloat16
    transformer = make_tiny_transformer(seed=0, dtype=dtype).cuda()
    controlnet = make_tiny_controlnet(seed=1, variant=None, control_in_dim=33, dtype=dtype).cuda()
    scheduler, latents, embeds, blend, context = inputs(dtype)
    control = ControlInput(controlnet, context, torch.full((2,), 0.75))
    loop = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cuda")
    run = dict(progress=False, blend=blend, control=control)
    for _ in range(2):
        loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, **run)
    torch.cuda.synchronize()
    reserved, pointers = torch.cuda.memory_reserved(), loop.buffer_pointers()
    with sync_free_steps(loop) as calls:  # any implicit device->host sync inside a step raises
        for _ in range(3):
            loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, **run)
    torch.cuda.synchronize()
    assert len(calls) == 3 * STEPS
    assert torch.cuda.memory_reserved() == reserved and loop.buffer_pointers() == pointers


def test_text_to_image_keeps_its_plain_graph_next_to_a_controlnet_one():
    """One loop serves both: the text-to-image slot has no task buffers and gives what it gave before."""
    dtype = torch.bfloat16
    transformer = make_tiny_transformer(seed=0, dtype=dtype).cuda()
    controlnet = make_tiny_controlnet(seed=1, variant=None, control_in_dim=16, dtype=dtype).cuda()
    scheduler, latents, embeds, _blend, _ = inputs(dtype)
    loop = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cuda")
    before = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    context = torch.randn(2, 16, 32, 32, device="cuda", dtype=dtype)
    loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False,
         control=ControlInput(controlnet, context, torch.ones(2)))
    after = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    assert torch.equal(before, after)
    plain = [s for s in loop._slots.values() if s.control is None]
    assert len(plain) == 1 and plain[0].blend is None
