"""LoRA with engines running: torch-compiled (no recompilation), FP8 (only the touched layers
re-quantised), engines holding their own weights (refit by name), and the fp16 range check."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

import zimage_trt.pipeline as pipeline_module
from zimage_trt.engines.base import DenoiserEngine, TorchDenoiserEngine
from zimage_trt.engines.torch_compiled import CompiledDenoiserEngine
from zimage_trt.lora.fp16_check import LoraFp16RangeWarning, blocks_out_of_range
from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.model.fp8 import Fp8Linear, quantize_rows
from zimage_trt.pipeline import ZImageTRTPipeline
from zimage_trt.testing.tiny import FP8_GPU_TINY, save_tiny_pipeline

from test_lora import CALL, assert_changed, assert_close_images, make_lora, reference, theirs, write_loras

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return write_loras(tmp_path_factory.mktemp("loras"))


def image(pipe, steps=CALL["num_inference_steps"]):
    return pipe(output_type="np", generator=torch.Generator().manual_seed(0), **{**CALL, "num_inference_steps": steps}).images


def one_step(pipe):
    """Latents after one step (bf16 and FP8 are slow on a CPU: one step and no VAE show the weights as well)."""
    call = {**CALL, "num_inference_steps": 1}
    return pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **call).images.float().numpy()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def compiled_pipe(tiny_path):
    """A pipeline whose denoiser is the torch-compiled engine (compiled here, once for the module)."""
    original = pipeline_module.open_denoiser

    def open_compiled(transformer, *args, **kwargs):
        return CompiledDenoiserEngine(StaticZImageDenoiser(transformer))

    pipeline_module.open_denoiser = open_compiled
    try:
        pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base = image(pipe)  # compiles every block kind
        image(pipe)  # the caption length is the same: nothing new to compile
    finally:
        pipeline_module.open_denoiser = original
    assert {loop.engine.kind for loop in pipe._loops.values()} == {"torch-compiled"}
    yield pipe, base
    pipe.close()


@pytest.mark.slow
def test_compiled_engine_switches_adapters_without_recompiling(compiled_pipe, tiny_path, loras):
    pipe, base = compiled_pipe
    graphs = graphs_compiled()
    assert graphs > 0, "nothing was compiled: the counter checks nothing"

    ref = reference(tiny_path)
    for p in (ref, pipe):
        p.load_lora_weights(loras / "a.safetensors", adapter_name="a")
        p.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
    with_b = image(pipe)
    assert_changed(with_b, base)
    assert_close_images(with_b, theirs(ref))
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], [0.7, -0.5])
    assert_close_images(image(pipe), theirs(ref))
    for p in (ref, pipe):
        p.fuse_lora(lora_scale=0.6)
    assert_close_images(image(pipe), theirs(ref))
    pipe.unfuse_lora()
    pipe.set_adapters("a", 0.0)
    np.testing.assert_array_equal(image(pipe), base)  # same engine, same computation, base weights
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image(pipe), base)
    assert graphs_compiled() == graphs, "merging adapters recompiled the engine"


def test_adapters_switch_without_a_single_dynamo_recompile(tiny_path, loras):
    """The fast form of the test above (every CI run): each block compiled with fullgraph=True as the
    engine compiles them, through a counting backend (dynamo's guards decide recompilation, whatever the
    backend); loading, switching, fusing, unloading add no frame."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    original = pipeline_module.open_denoiser

    def open_counted(transformer, *args, **kwargs):
        denoiser = StaticZImageDenoiser(transformer)
        for _, block in denoiser.named_blocks():
            block.compile(fullgraph=True, backend=counter)
        return TorchDenoiserEngine(denoiser)

    pipeline_module.open_denoiser = open_counted
    try:
        pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base = image(pipe, steps=1)
    finally:
        pipeline_module.open_denoiser = original
    compiled = counter.frame_count
    assert compiled > 0, "nothing went through the counting backend: the test checks nothing"
    eager = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    eager.set_progress_bar_config(disable=True)
    for p in (pipe, eager):
        p.load_lora_weights(loras / "a.safetensors", adapter_name="a")
        p.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
        p.set_adapters(["a", "b"], [0.7, -0.5])
    with_both = image(pipe, steps=1)
    assert_changed(with_both, base)
    assert_close_images(with_both, image(eager, steps=1))
    pipe.set_adapters("b")
    pipe.fuse_lora(lora_scale=0.5)
    image(pipe, steps=1)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image(pipe, steps=1), base)
    assert counter.frame_count == compiled, f"{counter.frame_count - compiled} recompilation(s)"


class OwnWeightsEngine(DenoiserEngine):
    """An engine with its own copy of the weights (as TensorRT has), taking updates by diffusers name."""

    kind = "own-weights"
    holds_own_weights = True

    def __init__(self, transformer):
        own = copy.deepcopy(transformer)
        super().__init__(torch.device("cpu"), torch.float32)
        self.inner = TorchDenoiserEngine(StaticZImageDenoiser(own))
        self.own = own
        self.updates = []

    def update_weights(self, weights):
        state = self.own.state_dict()
        unknown = sorted(set(weights) - set(state))
        assert not unknown, f"refit names the transformer does not have: {unknown[:3]}"
        with torch.no_grad():
            for name, value in weights.items():
                state[name].copy_(value)
        self.updates.append(sorted(weights))

    def run(self, *args, **kwargs):
        return self.inner.run(*args, **kwargs)


def test_engines_holding_their_own_weights_are_refitted_by_name(tiny_path, loras, monkeypatch):
    """Merged weights reach an engine with its own copy through update_weights: at each change, and at
    once for an engine opened after the adapters were loaded; its images are those of in-place merging."""
    opened, open_eager = [], pipeline_module.open_denoiser
    eager = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)

    def open_own(transformer, *args, **kwargs):
        if transformer is eager.transformer:
            return open_eager(transformer, *args, **kwargs)
        opened.append(OwnWeightsEngine(transformer))
        return opened[-1]

    eager.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipeline_module, "open_denoiser", open_own)
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = image(pipe)
    for p in (eager, pipe):
        p.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
    assert opened[0].updates[-1] == sorted(f"{m}.{k}.weight" for m in ("noise_refiner.0", "context_refiner.0",
                                                                       "layers.0", "layers.1")
                                          for k in ("attention.to_q", "attention.to_v", "feed_forward.w2"))
    assert_close_images(image(pipe), image(eager))
    for p in (eager, pipe):
        p.load_lora_weights(loras / "a.safetensors", adapter_name="a")
        p.set_adapters(["a", "b"], [0.5, 1.0])
    assert_close_images(image(pipe), image(eager))
    # A new shape opens a new engine after the merge: it gets the merged weights before its first step.
    later = pipe(output_type="np", generator=torch.Generator().manual_seed(0), **{**CALL, "width": 384}).images
    assert len(opened) == 2 and len(opened[1].updates) == 1
    wanted = eager(output_type="np", generator=torch.Generator().manual_seed(0), **{**CALL, "width": 384}).images
    assert_close_images(later, wanted)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image(pipe), base)


def test_fp8_requantises_only_the_touched_layers(tiny_path, loras):
    """FP8 (bf16 + e4m3 projections, on the CPU here): the touched layers get e4m3 weights and scales
    recomputed from the folder's 16-bit weights + the adapter; the others keep theirs bit for bit; unload
    gives every FP8 buffer and the image back bit for bit."""
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.bfloat16, precision="fp8")
    pipe.set_progress_bar_config(disable=True)
    base = one_step(pipe)  # the engine converts the blocks to FP8 as it opens
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 28
    before = {n: (m.weight_fp8.clone(), m.weight_scale.clone()) for n, m in layers.items()}

    pipe.load_lora_weights(loras / "b_kohya.safetensors", adapter_name="b")
    adapter = pipe._lora_state.adapters["b"]
    from diffusers import ZImageTransformer2DModel

    folder_weights = ZImageTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer").state_dict()
    for name, layer in layers.items():
        fp8, scale = layer.weight_fp8, layer.weight_scale
        if name in adapter.layers:
            factors = adapter.layers[name]
            merged = folder_weights[f"{name}.weight"].bfloat16().float() + factors.scale * factors.up @ factors.down
            want_fp8, want_scale = quantize_rows(merged.bfloat16())
            assert torch.equal(fp8.view(torch.uint8), want_fp8.view(torch.uint8)) and torch.equal(scale, want_scale), name
            assert not torch.equal(fp8.view(torch.uint8), before[name][0].view(torch.uint8)), name
        else:
            assert torch.equal(fp8.view(torch.uint8), before[name][0].view(torch.uint8)), name
            assert torch.equal(scale, before[name][1]), name
    assert_changed(one_step(pipe), base)

    pipe.unload_lora_weights()
    for name, layer in layers.items():
        assert torch.equal(layer.weight_fp8.view(torch.uint8), before[name][0].view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, before[name][1]), name
    np.testing.assert_array_equal(one_step(pipe), base)


def test_fp8_without_a_model_folder_is_refused_clearly(tiny_path, loras):
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.bfloat16, precision="fp8")
    pipe.set_progress_bar_config(disable=True)
    one_step(pipe)
    pipe.transformer.register_to_config(_name_or_path="")
    with pytest.raises(ValueError, match="FP8 layers .* keep no 16-bit weights"):
        pipe.load_lora_weights(loras / "a.safetensors")
    assert pipe.get_list_adapters() == {}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_lora_on_the_gpu_reaches_the_captured_cuda_graphs(tiny_path, loras, precision, tmp_path):
    """On the GPU the loop replays CUDA graphs captured before the adapter was loaded: the in-place
    weights must reach them (the image equals that of a pipeline loading the adapter before its first
    call). FP8: the blocks become FP8 as they arrive, the base weights come from the folder."""
    options = dict(device="cuda", torch_dtype=torch.bfloat16, precision=precision)
    if precision == "fp8":  # the default tiny feed-forward (170 wide) has no GPU FP8 product: FP8_GPU_TINY has
        tiny_path = save_tiny_pipeline(tmp_path / "fp8-tiny", seed=0, transformer_config=FP8_GPU_TINY)
        loras = tmp_path / "fp8-loras"
        loras.mkdir()
        state, config = make_lora(1, rank=4, alpha=8, transformer_config=FP8_GPU_TINY)
        ZImagePipeline.save_lora_weights(loras, transformer_lora_layers=state, weight_name="a.safetensors",
                                         transformer_lora_adapter_metadata=config.to_dict())

    def gpu_image(pipe):
        return pipe(output_type="np", generator=torch.Generator("cuda").manual_seed(0), **CALL).images

    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, **options)
    pipe.set_progress_bar_config(disable=True)
    base = gpu_image(pipe)
    layer = pipe.transformer.layers[0].attention.to_q
    before = (layer.weight_fp8 if precision == "fp8" else layer.weight).clone()
    pipe.load_lora_weights(loras / "a.safetensors", adapter_name="a")
    after = layer.weight_fp8 if precision == "fp8" else layer.weight
    assert after.device.type == "cuda" and not torch.equal(after.view(torch.uint8), before.view(torch.uint8))
    with_adapter = gpu_image(pipe)
    assert_changed(with_adapter, base)
    loaded_first = ZImageTRTPipeline.from_pretrained(tiny_path, **options)
    loaded_first.set_progress_bar_config(disable=True)
    loaded_first.load_lora_weights(loras / "a.safetensors", adapter_name="a")
    np.testing.assert_allclose(with_adapter, gpu_image(loaded_first), atol=2 / 255)
    pipe.unload_lora_weights()
    assert torch.equal(after.view(torch.uint8), before.view(torch.uint8))
    np.testing.assert_array_equal(gpu_image(pipe), base)


def test_fp16_range_is_measured_again_after_merging(tiny_path):
    """An adapter that blows up a projection is reported for fp16 engines (the engine's factors no longer
    keep the activations in range); a mild one is not."""
    pipe = ZImageTRTPipeline.from_pretrained(tiny_path, device="cpu", torch_dtype=torch.float32)
    assert blocks_out_of_range(pipe.transformer, {}) == {}
    state, config = make_lora(3, rank=2, alpha=2, targets=["w2"])
    huge = {f"transformer.{k}": v * (30000.0 if "lora_B" in k else 1.0) for k, v in state.items()}

    class Fp16Engine:  # what the check reads from an open engine: its dtype and downscale factors
        dtype = torch.float16
        denoiser = StaticZImageDenoiser(pipe.transformer)

    pipe._open_engines = lambda: [Fp16Engine()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(huge, adapter_name="huge")
    range_warnings = [w for w in caught if issubclass(w.category, LoraFp16RangeWarning)]
    assert range_warnings and "feed-forward" in str(range_warnings[0].message)
    pipe.unload_lora_weights()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights({f"transformer.{k}": v for k, v in state.items()}, adapter_name="mild")
    assert not [w for w in caught if issubclass(w.category, LoraFp16RangeWarning)]
