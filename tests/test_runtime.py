"""The runtime loop's invariants: same maths as diffusers' scheduler loop, persistent buffers, no
cache clearing, no host sync inside the loop, flat memory after warm-up (the last three on a GPU)."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_trt.engines.base import TorchDenoiserEngine
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.runtime.denoise_loop import DenoiseLoop
from zimage_trt.testing.tiny import ZIMAGE_TURBO_SCHEDULER_CONFIG, make_tiny_components

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@contextlib.contextmanager
def sync_free_steps(loop: DenoiseLoop):
    """Inside the block every step `loop` runs must be asynchronous: any implicit device->host sync in one
    raises. Yields the list that counts the steps run."""
    calls, original = [], loop._run_step

    def checked_step(slot):
        torch.cuda.set_sync_debug_mode("error")
        try:
            original(slot)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        calls.append(1)

    loop._run_step = checked_step
    try:
        yield calls
    finally:
        loop._run_step = original

def setup(device="cpu", steps=4, seed=0):
    transformer = make_tiny_components(seed=seed)["transformer"].to(device)
    scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), device=device)
    gen = torch.Generator(device).manual_seed(seed)
    latents = torch.randn(2, 16, 32, 32, generator=gen, device=device)
    embeds = [torch.randn(n, 32, generator=gen, device=device) for n in (20, 45)]
    return transformer, scheduler, latents, embeds


def diffusers_loop(transformer, scheduler, latents, embeds):
    """The denoising loop exactly as ZImagePipeline runs it (guidance 0)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_begin_index(0)
    x = latents.clone()
    for t in scheduler.timesteps:
        timestep = (1000 - t.expand(x.shape[0])) / 1000
        with torch.no_grad():
            out = transformer(list(x.unsqueeze(2).unbind(0)), timestep, embeds, return_dict=False)[0]
        noise_pred = -torch.stack([o.float() for o in out]).squeeze(2)
        x = scheduler.step(noise_pred, t, x, return_dict=False)[0]
    return x


def test_loop_matches_the_diffusers_scheduler_loop():
    transformer, scheduler, latents, embeds = setup()
    expected = diffusers_loop(transformer, scheduler, latents, embeds)
    loop = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cpu")
    got = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_buffers_are_allocated_once_per_shape():
    transformer, scheduler, latents, embeds = setup()
    loop = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cpu")
    first = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    pointers = loop.buffer_pointers()
    second = loop(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    assert loop.buffer_pointers() == pointers and len(pointers) == 1
    assert torch.equal(first, second), "same inputs, same result: nothing leaks between calls"
    loop(latents[:1], embeds[:1], None, scheduler.timesteps, scheduler.sigmas, progress=False)
    assert len(loop.buffer_pointers()) == 2 and loop.buffer_pointers()[0] == pointers[0]


def test_no_cache_clearing_in_the_call_path():
    """empty_cache() appears only in the out-of-memory recovery, never in a normal call."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "zimage_trt"
    offenders = []
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [n for n in ast.walk(func) if isinstance(n, ast.Attribute) and n.attr == "empty_cache"]
            if calls and func.name != "_release_after_oom":
                offenders.append(f"{path.name}:{func.name}")
    assert offenders == [], f"torch.cuda.empty_cache() in the call path: {offenders}"


@gpu
@needs_cuda
def test_cuda_graph_loop_equals_plain_loop_and_replays():
    transformer, scheduler, latents, embeds = setup("cuda")
    engine = TorchDenoiserEngine(StaticZImageDenoiser(transformer))
    plain = DenoiseLoop(engine, "cuda", use_cuda_graph=False)(latents, embeds, None, scheduler.timesteps,
                                                              scheduler.sigmas, progress=False)
    graphed = DenoiseLoop(engine, "cuda", use_cuda_graph=True)
    out = graphed(latents, embeds, None, scheduler.timesteps, scheduler.sigmas, progress=False)
    assert graphed.use_cuda_graph and next(iter(graphed._slots.values())).graph is not None
    assert (out - plain).abs().max().item() <= 1e-4 * plain.abs().max().item()
    assert len(graphed.last_step_times_ms) == len(scheduler.timesteps)


@gpu
@needs_cuda
def test_no_host_sync_inside_the_loop_and_flat_memory():
    transformer, scheduler, latents, embeds = setup("cuda")
    loop = DenoiseLoop(TorchDenoiserEngine(StaticZImageDenoiser(transformer)), "cuda")
    timesteps, sigmas = scheduler.timesteps, scheduler.sigmas
    for _ in range(2):  # warm-up: graphs captured, buffers allocated
        loop(latents, embeds, None, timesteps, sigmas, progress=False)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    pointers = loop.buffer_pointers()
    with sync_free_steps(loop) as calls:
        for _ in range(3):
            loop(latents, embeds, None, timesteps, sigmas, progress=False)
    torch.cuda.synchronize()
    assert len(calls) == 3 * len(timesteps)
    assert torch.cuda.memory_reserved() == reserved, "GPU memory grew after warm-up"
    assert loop.buffer_pointers() == pointers


def test_denoise_loop_hands_its_graph_release_to_engines_that_take_one():
    """TensorRT engines call the hook before close/refit; the loop must then drop its slots (graphs)."""
    import torch as _torch

    from zimage_trt.engines.base import DenoiserEngine
    from zimage_trt.runtime.denoise_loop import DenoiseLoop, StepSlot

    class EngineTakingReleaseHooks(DenoiserEngine):
        kind = "stand-in"

        def __init__(self):
            super().__init__("cpu", _torch.float32)
            self.hooks = []

        def add_release_hook(self, release):
            self.hooks.append(release)

        def run(self, latents, timestep, cap_feats, cap_lens, masked):
            raise AssertionError("not called")

    engine = EngineTakingReleaseHooks()
    loop = DenoiseLoop(engine)
    assert len(engine.hooks) == 1
    empty = _torch.empty(0)
    loop._slots[("shape",)] = StepSlot(empty, empty, empty, empty, empty, empty, cfg=False, normalization=0.0, masked=False)
    engine.hooks[0]()
    assert loop._slots == {}


class ControlStandInEngine:
    """A CPU stand-in for a torch-compiled engine running a ControlNet: records what it is told to keep."""

    kind = "stand-in"
    supports_cuda_graph = False
    runs_controlnet = True

    def __init__(self):
        from zimage_trt.engines.base import DenoiserEngine

        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.caption_layout = lambda lengths, key, batch: DenoiserEngine.caption_layout(self, lengths, key, batch)
        self.kept = []

    def controlnet_runner(self, controlnet):
        return controlnet

    def run(self, latents, timestep, cap_feats, cap_lens, masked, control=None):
        return torch.zeros_like(latents)

    def controlnet_kernels_compiled(self, controlnet, latent_shape, model_batch):
        self.kept.append((tuple(latent_shape), model_batch))


STAND_IN_CONTROLNET = torch.nn.Identity()


def control_call(loop, callback=None):
    from zimage_trt.runtime.denoise_loop import ControlInput

    latents = torch.zeros(1, 16, 4, 6)
    control = ControlInput(STAND_IN_CONTROLNET, torch.zeros(1, 3, 4, 6), torch.ones(2))
    timesteps, sigmas = torch.tensor([1000.0, 500.0]), torch.tensor([1.0, 0.5, 0.0])
    return loop(latents, [torch.zeros(5, 8)], None, timesteps, sigmas, callback=callback, progress=False,
                control=control)


def test_controlnet_kernels_are_kept_after_a_later_call_when_the_first_was_cancelled(monkeypatch):
    """A step callback that raises in the first ControlNet call at a shape (after its slot was made): the
    next, successful call at that shape still keeps what was compiled; and the progress bar is closed."""
    import zimage_trt.runtime.denoise_loop as denoise_loop

    bars = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.closed = False
            bars.append(self)

        def update(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(denoise_loop, "tqdm", Bar)
    engine = ControlStandInEngine()
    loop = DenoiseLoop(engine, "cpu")

    def cancel(i, t, latents):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        control_call(loop, cancel)
    assert len(loop._slots) == 1 and engine.kept == []
    assert bars[-1].closed, "the progress bar is closed on the way out of a failed loop"
    control_call(loop)
    assert engine.kept == [((1, 16, 4, 6), 1)]
    control_call(loop)
    assert engine.kept == [((1, 16, 4, 6), 1)], "kept once per slot"
