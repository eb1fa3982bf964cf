"""The text encoder's CUDA-graph runner and the GPU image conversion: both must give exactly what the
eager / diffusers path gives. The conversion's arithmetic is checked on the CPU too (same float32
operations), the graphs on a GPU only."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from zimage_trt.runtime.image_output import to_pil_on_gpu
from zimage_trt.runtime.text_encoder import MAX_GRAPHS, TextEncoderRunner
from zimage_trt.testing.tiny import make_tiny_components

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The module whose place_converting / transformer_blocks the pipeline calls (the FP8 block-by-block placement).
PLACEMENT_MODULE = "zimage_trt.runtime.placement"


def _placement(name):
    return getattr(__import__(PLACEMENT_MODULE, fromlist=[name]), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_image_conversion_is_bitwise_diffusers(device, dtype):
    gen = torch.Generator().manual_seed(0)
    image = (torch.rand(2, 3, 64, 48, generator=gen) * 2.4 - 1.2)
    # Values whose x*255 lands exactly on .5 after denormalising: rounding must be half-to-even as numpy's.
    image[0, 0, 0, :8] = torch.tensor([(k + 0.5) / 255 * 2 - 1 for k in range(8)])
    image = image.to(device, dtype)
    processor = VaeImageProcessor(vae_scale_factor=16)
    theirs = [np.asarray(im) for im in processor.postprocess(image, output_type="pil")]
    ours = [np.asarray(im) for im in to_pil_on_gpu(processor.postprocess(image, output_type="pt"))]
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (64, 48, 3)
        assert np.array_equal(a, b), f"max difference {np.abs(a.astype(int) - b).max()}"


def test_runner_on_cpu_is_the_eager_forward():
    te = make_tiny_components(seed=0)["text_encoder"]
    runner = TextEncoderRunner(te, torch.device("cpu"), use_cuda_graph=True)
    assert not runner.use_cuda_graph  # graphs only on CUDA
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    want = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(runner.hidden_states(ids, mask), want)


def _inputs(batch, length, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        mask[row, : int(torch.randint(1, length + 1, (1,), generator=gen))] = True
    return ids.to(device), mask.to(device)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_is_bitwise_eager(dtype):
    te = make_tiny_components(seed=0)["text_encoder"].to("cuda", dtype)
    runner = TextEncoderRunner(te, torch.device("cuda"))
    shapes = [(1, 64), (2, 64), (1, 40)]
    with torch.no_grad():
        for round_ in range(2):  # second round: replays of graphs captured while others exist (shared pool)
            for i, (batch, length) in enumerate(shapes):
                ids, mask = _inputs(batch, length, seed=10 * round_ + i)
                want = runner.eager(ids, mask).clone()
                got = runner.hidden_states(ids, mask).clone()
                assert torch.equal(got, want), f"{(batch, length)}: max diff {(got - want).abs().max().item()}"
    assert runner.use_cuda_graph and len(runner._graphs) == len(shapes)


@gpu
@needs_cuda
def test_graphs_are_bounded_and_a_host_sync_falls_back_to_eager():
    te = make_tiny_components(seed=0)["text_encoder"].to("cuda")
    runner = TextEncoderRunner(te, torch.device("cuda"))
    with torch.no_grad():
        for length in range(8, 8 + MAX_GRAPHS + 3):
            runner.hidden_states(*_inputs(1, length, seed=length))
        assert len(runner._graphs) == MAX_GRAPHS

        class Syncing(torch.nn.Module):  # a forward that asks the host for a value cannot be captured
            def forward(self, input_ids, attention_mask, output_hidden_states):
                scale = float(input_ids.float().mean().item() > -1)
                hidden = [input_ids.float() * scale] * 3
                return type("Out", (), {"hidden_states": hidden})()

        fallback = TextEncoderRunner(Syncing(), torch.device("cuda"))
        ids, mask = _inputs(1, 16, seed=0)
        with pytest.warns(UserWarning, match="cannot run in a CUDA graph"):
            out = fallback.hidden_states(ids, mask)
        assert not fallback.use_cuda_graph and torch.equal(out, ids.float())
    # The failed capture left the default CUDA generator usable: noise drawn without a generator works (before
    # runtime/graph_capture.py, the next torch.rand raised "Offset increment outside graph capture ...").
    torch.rand(2, 3, device="cuda")


def test_fp8_text_encoder_stays_close_to_bf16_and_is_smaller():
    from zimage_trt.model.fp8 import quantize_text_encoder_fp8

    te = make_tiny_components(seed=0)["text_encoder"].to(torch.bfloat16)
    ids, mask = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1)), torch.ones(2, 24, dtype=torch.bool)
    runner = TextEncoderRunner(te, torch.device("cpu"))
    with torch.no_grad():
        want = runner.hidden_states(ids, mask).float()
        bytes_before = sum(p.numel() * p.element_size() for p in te.buffers()) + sum(p.numel() * p.element_size() for p in te.parameters())
        swapped = quantize_text_encoder_fp8(te)
        got = runner.hidden_states(ids, mask).float()
    bytes_after = sum(p.numel() * p.element_size() for p in te.buffers()) + sum(p.numel() * p.element_size() for p in te.parameters())
    assert swapped == 7 * te.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert bytes_after < 0.75 * bytes_before
    rel = ((got - want).norm() / want.norm()).item()
    # e4m3 keeps 3 mantissa bits; through the tiny model's layers its features move ~9%: quantised (not
    # identical) yet close; a wrong scale or a broken swap lands far outside.
    assert 0 < rel < 0.15, rel


def test_fp8_text_encoder_needs_bf16():
    from zimage_trt.model.fp8 import quantize_text_encoder_fp8

    with pytest.raises(ValueError, match="bfloat16"):
        quantize_text_encoder_fp8(make_tiny_components(seed=0)["text_encoder"])  # fp32


def test_a_second_pipeline_keeps_fp8_weights_of_shared_components():
    """An FP8 pipeline converts the shared text encoder in place; a pipeline made later from the same
    components (any dtype) must keep those FP8 weights FP8, not cast them to 16-bit numbers."""
    from zimage_trt import ZImageTRTPipeline

    parts = make_tiny_components(seed=0)
    first = ZImageTRTPipeline.from_components(**parts, device="cpu", torch_dtype=torch.bfloat16, allow_fallback=True,
                                              text_encoder_fp8=True)
    assert first.text_encoder_fp8
    for dtype in (torch.bfloat16, torch.float32):
        ZImageTRTPipeline.from_components(**parts, device="cpu", torch_dtype=dtype, allow_fallback=True)
        fp8 = [b for b in parts["text_encoder"].buffers() if b.dtype == torch.float8_e4m3fn]
        assert len(fp8) == 7 * parts["text_encoder"].config.num_hidden_layers
        assert parts["vae"].dtype == dtype  # everything else did move


def test_text_encoder_fp8_argument_is_checked():
    from zimage_trt import ZImageTRTPipeline

    with pytest.raises(TypeError, match="text_encoder_fp8 must be True, False or None"):
        ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device="cpu", text_encoder_fp8="yes")


def _fp8_reference(device):
    """The tiny bf16 components with transformer blocks and text encoder converted to FP8 where they stand."""
    from zimage_trt.model.fp8 import quantize_block_fp8
    from zimage_trt.model.fp8 import quantize_text_encoder_fp8

    reference = make_tiny_components(seed=0, dtype=torch.bfloat16)
    for key in ("transformer", "text_encoder"):
        reference[key].to(device)
    for block in _placement("transformer_blocks")(reference["transformer"]):
        quantize_block_fp8(block)
    quantize_text_encoder_fp8(reference["text_encoder"])
    return reference


def _assert_same_fp8_model(parts, reference):
    from zimage_trt.model.fp8 import Fp8Linear

    for key in ("transformer", "text_encoder"):
        ours, theirs = parts[key].state_dict(), reference[key].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k].float(), theirs[k].float()) for k in ours)
        assert any(isinstance(m, Fp8Linear) for m in parts[key].modules())


def test_place_converting_converts_each_block_and_matches_converting_in_place():
    """What the CPU can check of the FP8 placement (from_components uses it on CUDA only; the GPU test
    below checks that it does): the helper converts every block once, in order, as it places it, and the
    result is the same FP8 model as converting the whole model where it stands."""
    from zimage_trt import ZImageTRTPipeline
    from zimage_trt.model.fp8 import quantize_block_fp8
    from zimage_trt.model.fp8 import quantize_text_encoder_fp8

    place_converting, transformer_blocks = _placement("place_converting"), _placement("transformer_blocks")
    parts = make_tiny_components(seed=0, dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    for module, blocks, convert in ((parts["transformer"], transformer_blocks(parts["transformer"]), quantize_block_fp8),
                                    (parts["text_encoder"], list(parts["text_encoder"].layers), quantize_text_encoder_fp8)):
        converted = []

        def recording_convert(block, convert=convert, converted=converted):
            converted.append(block)
            convert(block)

        place_converting(module, blocks, cpu, recording_convert)
        assert len(blocks) > 1 and [id(b) for b in converted] == [id(b) for b in blocks]
    _assert_same_fp8_model(parts, _fp8_reference(cpu))
    pipe = ZImageTRTPipeline.from_components(**parts, device="cpu", torch_dtype=torch.bfloat16, allow_fallback=True,
                                             precision="fp8", text_encoder_fp8=True)
    assert pipe.text_encoder_fp8


@gpu
@needs_cuda
def test_fp8_pipeline_converts_blocks_on_their_way_and_matches_converting_in_place(monkeypatch):
    """precision='fp8' from CPU components onto the GPU: from_components itself converts every block as it
    places it (one block of 16-bit weights on the device at a time), and the result is the same FP8 model
    as converting the whole model where it stands."""
    from zimage_trt import ZImageTRTPipeline

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    place_converting = _placement("place_converting")
    placed = []  # (module class, number of blocks) for each call that from_components makes

    def recording(module, blocks, device, convert):
        blocks = list(blocks)
        placed.append((type(module).__name__, len(blocks)))

        def convert_checked(block):
            position = next(i for i, b in enumerate(blocks) if b is block)
            assert all(p.device.type == "cuda" for p in block.parameters())
            # The blocks placed later are still on the CPU: the whole 16-bit model never sits on the GPU.
            assert all(p.device.type == "cpu" for b in blocks[position + 1:] for p in b.parameters())
            convert(block)

        place_converting(module, blocks, device, convert_checked)

    monkeypatch.setattr(f"{PLACEMENT_MODULE}.place_converting", recording)
    parts = make_tiny_components(seed=0, dtype=torch.bfloat16)
    n_blocks = len(_placement("transformer_blocks")(parts["transformer"]))
    pipe = ZImageTRTPipeline.from_components(**parts, device="cuda", torch_dtype=torch.bfloat16, allow_fallback=True,
                                             precision="fp8", text_encoder_fp8=True)
    assert placed == [("ZImageTransformer2DModel", n_blocks),
                      ("Qwen3Model", parts["text_encoder"].config.num_hidden_layers)]
    assert pipe.text_encoder_fp8
    _assert_same_fp8_model(parts, _fp8_reference(torch.device("cuda")))  # both converted on the GPU


def test_images_are_copies_not_views_of_the_host_buffer():
    # The pinned buffer is reused by the next decode of that shape: PIL's RGB images must own their pixels.
    from PIL import Image

    pixels = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels[1])
    pixels[1] = 200
    assert np.asarray(image).max() == 0 and image.mode == "RGB"


@gpu
@needs_cuda
def test_gpu_conversion_through_pinned_buffers_is_bitwise_and_raises_on_non_finite_pixels():
    from zimage_trt.errors import NonFiniteOutputError
    from zimage_trt.runtime.image_output import PinnedImages

    processor = VaeImageProcessor(vae_scale_factor=16)
    staging = PinnedImages(keep=1)
    first_in = torch.rand(2, 3, 64, 48, device="cuda", dtype=torch.bfloat16) * 2 - 1
    first = [np.asarray(im).copy() for im in to_pil_on_gpu(processor.postprocess(first_in, output_type="pt"), staging)]
    images = to_pil_on_gpu(processor.postprocess(first_in, output_type="pt"), staging)
    to_pil_on_gpu(processor.postprocess(-first_in, output_type="pt"), staging)  # reuses the buffer
    theirs = [np.asarray(im) for im in processor.postprocess(first_in, output_type="pil")]
    for a, b, c in zip(images, first, theirs, strict=True):
        assert np.array_equal(np.asarray(a), b) and np.array_equal(b, c)
    bad = first_in.clone()
    bad[1, 0, 3, 3] = float("nan")
    finite = torch.isfinite(bad).all()
    with pytest.raises(NonFiniteOutputError, match="NaN/inf pixels"):
        to_pil_on_gpu(processor.postprocess(bad, output_type="pt"), staging, finite)
