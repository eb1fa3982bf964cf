"""diffusers' own fast tests of `ZImagePipeline`, with `ZImageTRTPipeline` in its place, on the CPU.

diffusers tests its pipeline in tests/pipelines/z_image/test_z_image.py (its `PipelineTesterMixin` adds
the common cases). This file builds what that one builds (its dummy components, its inputs, its
expected output slice) and checks what its cases check, against our class constructed from those very
components as a user swapping the import would: `ZImageTRTPipeline(**components)`. Each test is named
after the diffusers case it follows.

One difference is forced: the file's tokenizer is downloaded from the hub
(hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration, Qwen2's vocabulary and Qwen2-VL's
chat template), and tests here run offline. `standin_tokenizer` builds, in memory, one that gives the
same token stream where we know Qwen2's ids (the template's special tokens and default system prompt,
which with max_sequence_length=16 leave room for two words of the prompt) and ids of our own for the
prompt's words. The expected slice then holds within the file's tolerance, though not exactly (the
prompt words' ids differ), so every image is also compared with diffusers' `ZImagePipeline` on the same
components, tightly: that is what pins the numbers down.

Cases of the mixin that do not concern a call of this pipeline are left out: saving and loading
(`save_pretrained`), fp16 and offloading (GPU), attention slicing, xformers, layerwise casting, and
`encode_prompt` called with diffusers' arguments (ours takes a list of prompts and returns a list of
embeddings; its point, prompt_embeds without a text encoder, is `test_prompt_embeds_without_text_encoder`).
"""

import inspect
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from zimage_trt.pipeline import PromptTruncatedWarning, ZImageTRTPipeline, ZImageTRTPipelineOutput

# The file's test_inference: the first 8 and last 8 values of image 0 (output_type="pt"), atol 5e-2.
EXPECTED_SLICE = torch.tensor([0.4622, 0.4532, 0.4714, 0.5087, 0.5371, 0.5405, 0.4492, 0.4479,
                               0.2984, 0.2783, 0.5409, 0.6577, 0.3952, 0.5524, 0.5262, 0.453])
# TEXT_TO_IMAGE_PARAMS without cross_attention_kwargs, and the file's required optional parameters.
PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds", "negative_prompt_embeds"}
REQUIRED_OPTIONAL = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                     "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}
BATCH_PARAMS = ("prompt", "negative_prompt")  # TEXT_TO_IMAGE_BATCH_PARAMS
# Ours against diffusers' on the same components: the same maths by two code paths, fp32 on the CPU.
PARITY_ATOL = 1e-4


# Qwen2's ids of the chat template's tokens (byte-level pieces: "Ċ" is "\n", "Ġ" a leading space).
QWEN2_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "system": 8948, "Ċ": 198,
             "You": 2610, "Ġare": 525, "Ġa": 264, "Ġhelpful": 10950, "Ġassistant": 17847, ".": 13, "user": 872,
             "assistant": 77091}
PROMPT_WORDS = ("dance", "Ġmonkey", "bad", "Ġquality", "very", "Ġlong")  # ours: 1000, 1001, ...
# Qwen2-VL's layout: a default system turn unless the chat has one, then the turns, then the reply's opening.
QWEN2_VL_LIKE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def standin_tokenizer() -> PreTrainedTokenizerFast:
    """Whole byte-level words -> ids (unknown words -> <unk>, id 0), Qwen2's special tokens and padding."""
    vocab = {"<unk>": 0, **QWEN2_IDS, **{word: 1000 + i for i, word in enumerate(PROMPT_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = QWEN2_VL_LIKE_TEMPLATE
    return tokenizer


def test_standin_tokenizer_gives_qwen2s_stream_for_the_template():
    tokenizer = standin_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "dance monkey"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\ndance monkey"
                    "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, max_length=16, truncation=True, padding="max_length").input_ids
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 1000, 1001]


def dummy_components() -> dict:
    """The file's get_dummy_components, seeds and all (the tokenizer: the offline stand-in)."""
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # (the pad tokens start as torch.empty: the file fixes them to ones)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1, latent_channels=16,
        norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=512,
    ))
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder,
            "tokenizer": standin_tokenizer()}


def dummy_inputs(seed: int = 0) -> dict:
    """The file's get_dummy_inputs."""
    return {
        "prompt": "dance monkey", "negative_prompt": "bad quality",
        "generator": torch.Generator("cpu").manual_seed(seed), "num_inference_steps": 2, "guidance_scale": 3.0,
        "cfg_normalization": False, "cfg_truncation": 1.0, "height": 32, "width": 32, "max_sequence_length": 16,
        "output_type": "pt",
    }


def batched(inputs: dict, batch_size: int) -> dict:
    """The mixin's batching: prompts cut to unequal lengths, the last one very long; a generator per image."""
    out = dict(inputs)
    prompt = inputs["prompt"]
    out["prompt"] = [prompt[: len(prompt) // i] for i in range(1, batch_size + 1)]
    out["prompt"][-1] = 100 * "very long"
    out["negative_prompt"] = batch_size * [inputs["negative_prompt"]]
    out["generator"] = [torch.Generator("cpu").manual_seed(i) for i in range(batch_size)]
    return out


def ours() -> ZImageTRTPipeline:
    pipe = ZImageTRTPipeline(**dummy_components())
    pipe.set_progress_bar_config(disable=None)
    return pipe


def theirs() -> ZImagePipeline:
    pipe = ZImagePipeline(**dummy_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _one_thread(one_cpu_thread):
    yield


@pytest.fixture(scope="module")
def pipe():
    return ours()


@pytest.fixture(scope="module")
def reference():
    return theirs()


def quiet(pipe, **inputs):
    # max_sequence_length=16 cuts every prompt here; the warning (once per pipeline) is not the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return pipe(**inputs)


# -- the file's own cases ------------------------------------------------------------------------------
def test_inference(pipe, reference):
    image = quiet(pipe, **dummy_inputs()).images[0]
    assert image.shape == (3, 32, 32)
    flat = image.flatten()
    generated = torch.cat([flat[:8], flat[-8:]])
    assert torch.allclose(generated, EXPECTED_SLICE, atol=5e-2), (generated - EXPECTED_SLICE).abs().max()
    # With the stand-in tokenizer, what pins the numbers down is diffusers' output on the same components.
    expected = reference(**dummy_inputs()).images[0]
    torch.testing.assert_close(image, expected, atol=PARITY_ATOL, rtol=0)


def test_inference_batch_single_identical(pipe):
    inputs = dummy_inputs()
    single = quiet(pipe, **inputs)[0]
    batch = quiet(pipe, **batched(dummy_inputs(), 3))[0]
    assert batch.shape[0] == 3
    assert np.abs(batch[0].numpy() - single[0].numpy()).max() < 1e-1  # the file's expected_max_diff


def assert_distinct(images):
    """Every image of a call its own (each from its own noise): no two alike."""
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert (images[i] - images[j]).abs().max() > 1e-3, (i, j)


def test_num_images_per_prompt(pipe, reference):
    for batch_size in (1, 2):
        for per_prompt in (1, 2):
            inputs = dummy_inputs()
            for key in BATCH_PARAMS:
                inputs[key] = batch_size * [inputs[key]]
            images = quiet(pipe, **inputs, num_images_per_prompt=per_prompt)[0]
            assert images.shape[0] == batch_size * per_prompt
            inputs["generator"] = torch.Generator("cpu").manual_seed(0)
            expected = reference(**inputs, num_images_per_prompt=per_prompt)[0]
            torch.testing.assert_close(images, expected, atol=PARITY_ATOL, rtol=0)
            assert_distinct(images)


def test_vae_tiling():
    # The file checks the signed (untiled - tiled).max() < 0.2, which reads 0.188 here while the largest
    # absolute difference is 0.227: diffusers' own tiling moves pixels that much at this size. So ours is
    # compared with diffusers' ZImagePipeline, untiled and tiled, and moves no more than it.
    pipe, reference = ours(), theirs()
    inputs = lambda: {**dummy_inputs(), "height": 128, "width": 128}  # noqa: E731  (a fresh generator each)
    without_tiling, expected_without = quiet(pipe, **inputs())[0], reference(**inputs())[0]
    pipe.vae.enable_tiling()
    reference.vae.enable_tiling()
    with_tiling, expected_with = quiet(pipe, **inputs())[0], reference(**inputs())[0]
    torch.testing.assert_close(without_tiling, expected_without, atol=PARITY_ATOL, rtol=0)
    torch.testing.assert_close(with_tiling, expected_with, atol=PARITY_ATOL, rtol=0)
    moved, moved_by_diffusers = ((a - b).abs().max().item() for a, b in ((without_tiling, with_tiling),
                                                                         (expected_without, expected_with)))
    assert 1e-3 < moved <= moved_by_diffusers + PARITY_ATOL  # tiling ran, and costs what it costs diffusers


# -- the mixin's cases that concern a call -------------------------------------------------------------
def test_pipeline_call_signature():
    parameters = inspect.signature(ZImageTRTPipeline.__call__).parameters
    assert PARAMS <= set(parameters), PARAMS - set(parameters)
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert REQUIRED_OPTIONAL <= optional, REQUIRED_OPTIONAL - optional


def test_inference_batch_consistent(pipe, reference):
    output = quiet(pipe, **batched(dummy_inputs(), 2))
    assert len(output[0]) == 2
    torch.testing.assert_close(output[0], reference(**batched(dummy_inputs(), 2))[0], atol=PARITY_ATOL, rtol=0)
    assert_distinct(output[0])


def test_dict_tuple_outputs_equivalent(pipe):
    as_dict = quiet(pipe, **dummy_inputs())
    as_tuple = quiet(pipe, **dummy_inputs(), return_dict=False)
    assert isinstance(as_dict, ZImageTRTPipelineOutput) and type(as_tuple) is tuple and len(as_tuple) == 1
    assert as_dict[0] is as_dict.images and as_dict["images"] is as_dict.images
    assert np.abs(as_dict[0].numpy() - as_tuple[0].numpy()).max() < 1e-4


def test_components_function():
    components = dummy_components()
    pipe = ZImageTRTPipeline(**components)
    assert set(pipe.components) == set(components)
    assert all(pipe.components[name] is part for name, part in components.items())


def test_cfg(pipe, reference):
    inputs = dummy_inputs()
    without_cfg = quiet(pipe, **{**inputs, "guidance_scale": 1.0})[0]
    with_cfg = quiet(pipe, **{**dummy_inputs(), "guidance_scale": 7.5})[0]
    assert with_cfg.shape == without_cfg.shape
    assert (with_cfg - without_cfg).abs().max() > 1e-2  # guidance changes the image
    torch.testing.assert_close(with_cfg, reference(**{**dummy_inputs(), "guidance_scale": 7.5})[0],
                               atol=PARITY_ATOL, rtol=0)


def test_callback_inputs(pipe):
    assert pipe._callback_tensor_inputs == ["latents"]

    def subset(p, i, t, kwargs):
        assert set(kwargs) <= set(p._callback_tensor_inputs)
        return kwargs

    def everything(p, i, t, kwargs):
        assert set(kwargs) == set(p._callback_tensor_inputs)
        return kwargs

    def zero_at_last_step(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    inputs = {**dummy_inputs(), "output_type": "latent"}
    quiet(pipe, **inputs, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"])
    quiet(pipe, **inputs, callback_on_step_end=everything,
          callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    output = quiet(pipe, **inputs, callback_on_step_end=zero_at_last_step,
                   callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)[0]
    assert pipe.num_timesteps == 2
    assert output.abs().sum() == 0


def test_callback_cfg(pipe, reference):
    def more_guidance(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    inputs = {**dummy_inputs(), "guidance_scale": 2.0}
    out = quiet(pipe, **inputs, callback_on_step_end=more_guidance,
                callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)[0]
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps
    # Not only counted: the second step ran with guidance 3, as diffusers' does.
    expected = reference(**{**dummy_inputs(), "guidance_scale": 2.0}, callback_on_step_end=more_guidance,
                         callback_on_step_end_tensor_inputs=["latents"])[0]
    torch.testing.assert_close(out, expected, atol=PARITY_ATOL, rtol=0)
    plain = quiet(pipe, **{**dummy_inputs(), "guidance_scale": 2.0})[0]
    assert (plain - out).abs().max() > 1e-3


def test_callback_interrupt(pipe, reference):
    """diffusers' `pipe._interrupt`: set by the callback at step 0, no further step runs (nor callback) and
    the latents so far are decoded, as diffusers' loop does (`continue` past the steps, then the VAE)."""
    def interrupt_at_first_step(p, i, t, kwargs):
        seen.append(i)
        if i == 0:
            p._interrupt = True
        return kwargs

    inputs = lambda: {**dummy_inputs(), "num_inference_steps": 3}  # noqa: E731  (a fresh generator each)
    seen = []
    out = quiet(pipe, **inputs(), callback_on_step_end=interrupt_at_first_step)
    assert seen == [0] and len(out.timings.step_ms) == 1 and pipe.interrupt
    seen = []
    expected = reference(**inputs(), callback_on_step_end=interrupt_at_first_step)[0]
    assert seen == [0]
    torch.testing.assert_close(out.images, expected, atol=PARITY_ATOL, rtol=0)
    # The next call starts afresh (the flag is reset) and runs every step.
    seen = []
    full = quiet(pipe, **inputs(), callback_on_step_end=lambda p, i, t, kwargs: seen.append(i) or kwargs)
    assert seen == [0, 1, 2] and not pipe.interrupt and (full.images - out.images).abs().max() > 1e-3


def test_to_device():
    components = dummy_components()
    pipe = ZImageTRTPipeline(**components, device="cpu")
    assert pipe.to("cpu") is pipe
    assert all(part.device.type == "cpu" for part in components.values() if getattr(part, "device", None))
    assert not np.isnan(quiet(pipe, **dummy_inputs())[0].numpy()).any()
    # Moving after construction is refused, saying where to choose the device and dtype instead.
    with pytest.raises(ValueError, match=r"runs on cpu in torch.float32.*device=/torch_dtype="):
        pipe.to(dtype=torch.float16)
    with pytest.raises(ValueError, match="cannot move to cuda"):
        pipe.to("cuda")


def test_prompt_embeds_without_text_encoder(pipe):
    """test_encode_prompt_works_in_isolation's point: embeddings from one pipeline, images from another
    without text encoder or tokenizer, called with the default max_sequence_length (512, more than
    this transformer's 254 caption positions: nothing is tokenised, so it does not matter)."""
    inputs = dummy_inputs()
    positive = pipe.encode_prompt([inputs.pop("prompt")], inputs["max_sequence_length"])
    negative = pipe.encode_prompt([inputs.pop("negative_prompt")], inputs.pop("max_sequence_length"))
    components = {**dummy_components(), "text_encoder": None, "tokenizer": None}
    without_text = ZImageTRTPipeline(**components)
    out = without_text(**inputs, prompt_embeds=positive, negative_prompt_embeds=negative)[0]
    full = quiet(pipe, **dummy_inputs())[0]
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


# -- beyond the file: the same images as diffusers', and the rules a drop-in user meets ----------------
PARITY_CASES = {
    "batch_of_three": lambda: batched(dummy_inputs(), 3),
    "two_per_prompt": lambda: {**dummy_inputs(), "num_images_per_prompt": 2},
    "128px_no_cfg": lambda: {**dummy_inputs(), "height": 128, "width": 96, "guidance_scale": 0.0},
    "16px": lambda: {**dummy_inputs(), "height": 16, "width": 16},
    # This VAE has two blocks: 2 pixels a latent pixel, 4 a token; the RoPE table holds 32 tokens a side.
    "largest_the_rope_holds": lambda: {**dummy_inputs(), "height": 128, "width": 16, "num_inference_steps": 1},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_images_match_diffusers(pipe, reference, case):
    ours_out = quiet(pipe, **PARITY_CASES[case]())[0]
    expected = reference(**PARITY_CASES[case]())[0]
    torch.testing.assert_close(ours_out, expected, atol=PARITY_ATOL, rtol=0)


def test_size_past_the_rope_table_is_refused(pipe):
    with pytest.raises(ValueError, match=r"height=144 is 36 image tokens.*axes_lens\[1\]=32.*at most 128 pixels"):
        pipe(**{**dummy_inputs(), "height": 144})
    with pytest.raises(ValueError, match=r"width=40 is not a multiple of 16"):
        pipe(**{**dummy_inputs(), "width": 40})


def test_attention_kwargs_neutral_scale_is_honoured_others_refused(pipe):
    plain = quiet(pipe, **dummy_inputs())[0]
    for name in ("joint_attention_kwargs", "attention_kwargs"):
        same = quiet(pipe, **dummy_inputs(), **{name: {"scale": 1.0}})[0]
        assert torch.equal(plain, same)  # the same computation on the same tensors
        assert pipe.joint_attention_kwargs == {"scale": 1.0}
        with pytest.raises(ValueError, match=rf"{name}\['scale'\]=0.5: a per-call LoRA scale.*set_adapters"):
            pipe(**dummy_inputs(), **{name: {"scale": 0.5}})
        with pytest.raises(ValueError, match=rf"{name} may hold only 'scale'.*\['foo'\]"):
            pipe(**dummy_inputs(), **{name: {"foo": 1}})
    with pytest.raises(ValueError, match="at most one of joint_attention_kwargs and attention_kwargs"):
        pipe(**dummy_inputs(), joint_attention_kwargs={}, attention_kwargs={})


def test_max_sequence_length_is_checked_only_when_text_is_tokenised(pipe):
    with pytest.raises(ValueError, match=r"max_sequence_length=512 exceeds the 254 caption tokens.*<= 254"):
        pipe(**{**dummy_inputs(), "max_sequence_length": 512})


def test_truncation_warns_once_per_pipeline():
    pipe = ours()
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 0 is \d+ tokens.*max_sequence_length=16.*once per pipeline"):
        pipe(**dummy_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        pipe(**dummy_inputs())  # the same truncation again: silent, as diffusers always is


@pytest.mark.gpu
def test_callback_guidance_reaches_the_cuda_graph():
    """On a GPU each step is a replayed CUDA graph: a guidance changed by a callback must reach it."""
    def more_guidance(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    pipe = ZImageTRTPipeline(**dummy_components(), device="cuda", torch_dtype=torch.float32, compile_vae=False)
    pipe.set_progress_bar_config(disable=True)
    reference = ZImagePipeline(**dummy_components()).to("cuda")
    reference.set_progress_bar_config(disable=True)
    for callback in (None, more_guidance):
        inputs = {**dummy_inputs(), "guidance_scale": 2.0, "num_inference_steps": 3, "callback_on_step_end": callback}
        out = quiet(pipe, **inputs)[0]
        expected = reference(**{**inputs, "generator": torch.Generator("cpu").manual_seed(0)})[0]
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
