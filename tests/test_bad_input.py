"""Every bad argument fails at once with an error naming the argument, the value and the rule."""



import pytest
import torch


from zimage_trt.pipeline import PromptTruncatedWarning
from zimage_trt.testing.tiny import TINY_TEXT_HIDDEN

FEATURES = TINY_TEXT_HIDDEN  # the tiny text encoder's hidden size = the transformer's cap_feat_dim


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pipe(tiny_cpu_pipe):
    return tiny_cpu_pipe


def embeds(*lengths, features=FEATURES):
    return [torch.randn(n, features) for n in lengths]


def nan_embeds():
    item = torch.randn(5, FEATURES)
    item[2, 3] = float("nan")
    return [item]


def nan_latents():
    latents = torch.randn(1, 16, 32, 32)
    latents[0, 0, 0, 0] = float("inf")
    return latents


def never_called(*args):
    raise AssertionError("a bad request must fail before any step runs")


GOOD = dict(prompt="a red fox", height=256, width=256, num_inference_steps=1, output_type="latent")

# id -> (arguments replacing GOOD's, exception type, regex the message must match)
BAD_INPUTS = {
    "height_not_multiple_of_16": (dict(height=250), ValueError, r"height=250 is not a multiple of 16.*use 240 or 256"),
    "width_not_multiple_of_16": (dict(width=1000), ValueError, r"width=1000 is not a multiple of 16"),
    "height_zero": (dict(height=0), ValueError, r"height=0 must be a positive multiple of 16"),
    "width_past_the_rope_table": (dict(width=8208), ValueError, r"width=8208 is 513 image tokens.*at most 8192 pixels"),
    "height_not_int": (dict(height="256"), TypeError, r"height must be an int.*'256'"),
    "height_float": (dict(height=256.0), TypeError, r"height must be an int.*256\.0"),
    "steps_zero": (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be >= 1, got 0"),
    "steps_negative": (dict(num_inference_steps=-3), ValueError, r"num_inference_steps must be >= 1, got -3"),
    "steps_float": (dict(num_inference_steps=2.5), TypeError, r"num_inference_steps must be an int.*2\.5"),
    "guidance_negative": (dict(guidance_scale=-1.0), ValueError, r"guidance_scale must be >= 0.*got -1\.0"),
    "guidance_nan": (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be finite, got nan"),
    "guidance_str": (dict(guidance_scale="3"), TypeError, r"guidance_scale must be a real number.*'3'"),
    "cfg_normalization_negative": (dict(cfg_normalization=-1.0), ValueError, r"cfg_normalization must be >= 0"),
    "cfg_truncation_str": (dict(cfg_truncation="half"), TypeError, r"cfg_truncation must be a real number.*'half'"),
    "prompt_empty_list": (dict(prompt=[]), ValueError, r"prompt is an empty list"),
    "prompt_int": (dict(prompt=123), TypeError, r"prompt must be a str or a list of str, got int"),
    "prompt_list_with_non_str": (dict(prompt=["ok", 5]), TypeError, r"prompt\[1\] must be a str, got int 5"),
    "prompt_and_prompt_embeds": (dict(prompt_embeds=embeds(4)), ValueError, r"exactly one of prompt and prompt_embeds, got both"),
    "neither_prompt_nor_embeds": (dict(prompt=None), ValueError, r"exactly one of prompt and prompt_embeds, got neither"),
    "prompt_embeds_str": (dict(prompt=None, prompt_embeds="a fox"), TypeError, r"prompt_embeds must be a list of \[tokens, 32\] tensors, got str"),
    "prompt_embeds_item_not_tensor": (dict(prompt=None, prompt_embeds=[[0.0] * FEATURES]), TypeError, r"prompt_embeds\[0\] must be a torch.Tensor, got list"),
    "prompt_embeds_wrong_features": (dict(prompt=None, prompt_embeds=embeds(4, features=48)), ValueError, r"prompt_embeds\[0\] must have shape \[tokens, 32\].*got \(4, 48\)"),
    "prompt_embeds_1d": (dict(prompt=None, prompt_embeds=[torch.randn(FEATURES)]), ValueError, r"prompt_embeds\[0\] must have shape \[tokens, 32\].*got \(32,\)"),
    "prompt_embeds_no_tokens": (dict(prompt=None, prompt_embeds=embeds(0)), ValueError, r"prompt_embeds\[0\] has 0 tokens"),
    "prompt_embeds_too_many_tokens": (dict(prompt=None, prompt_embeds=embeds(5000)), ValueError, r"prompt_embeds\[0\] has 5000 tokens; the transformer takes 1\.\.1022"),
    "prompt_embeds_int_dtype": (dict(prompt=None, prompt_embeds=[torch.ones(4, FEATURES, dtype=torch.long)]), TypeError, r"prompt_embeds\[0\] must be a floating-point tensor, got dtype torch.int64"),
    "prompt_embeds_nan": (dict(prompt=None, prompt_embeds=nan_embeds()), ValueError, r"prompt_embeds\[0\] contains NaN or inf"),
    "prompt_embeds_empty_list": (dict(prompt=None, prompt_embeds=[]), ValueError, r"prompt_embeds is an empty list"),
    "prompt_embeds_cfg_without_negative": (dict(prompt=None, prompt_embeds=embeds(4), guidance_scale=2.0), ValueError, r"guidance_scale > 0 with prompt_embeds needs negative_prompt_embeds"),
    "negative_prompt_count": (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"], guidance_scale=2.0), ValueError, r"negative_prompt has 3 entries but there are 2 prompts"),
    "negative_prompt_int": (dict(negative_prompt=7, guidance_scale=2.0), TypeError, r"negative_prompt must be a str or a list of str, got int"),
    "negative_embeds_count": (dict(prompt=None, prompt_embeds=embeds(4, 5), negative_prompt_embeds=embeds(3), guidance_scale=2.0), ValueError, r"negative_prompt_embeds has 1 entries but there are 2 prompts"),
    "negative_prompt_and_embeds": (dict(negative_prompt="x", negative_prompt_embeds=embeds(3), guidance_scale=2.0), ValueError, r"at most one of negative_prompt and negative_prompt_embeds"),
    "latents_wrong_shape": (dict(latents=torch.randn(1, 16, 32, 48)), ValueError, r"latents has shape \(1, 16, 32, 48\), expected \(1, 16, 32, 32\)"),
    "latents_wrong_batch": (dict(latents=torch.randn(1, 16, 32, 32), num_images_per_prompt=2), ValueError, r"latents has shape \(1, 16, 32, 32\), expected \(2, 16, 32, 32\)"),
    "latents_int_dtype": (dict(latents=torch.zeros(1, 16, 32, 32, dtype=torch.int32)), TypeError, r"latents must be a floating-point tensor.*torch.int32"),
    "latents_not_tensor": (dict(latents=[[0.0]]), TypeError, r"latents must be a torch.Tensor, got list"),
    "latents_inf": (dict(latents=nan_latents()), ValueError, r"latents contains NaN or inf"),
    "output_type_unknown": (dict(output_type="jpg"), ValueError, r"output_type must be one of \['pil', 'np', 'pt', 'latent'\], got 'jpg'"),
    "images_per_prompt_zero": (dict(num_images_per_prompt=0), ValueError, r"num_images_per_prompt must be >= 1, got 0"),
    "generator_list_too_short": (dict(prompt=["a", "b"], num_images_per_prompt=2, generator=[torch.Generator()] * 3), ValueError, r"list of 3 generators but 4 images are requested"),
    "generator_wrong_type": (dict(generator=42), TypeError, r"generator must be a torch.Generator or a list of them, got int"),
    "generator_list_item_wrong_type": (dict(generator=[42]), TypeError, r"generator\[0\] must be a torch.Generator, got int"),
    "max_sequence_length_zero": (dict(max_sequence_length=0), ValueError, r"max_sequence_length must be >= 1, got 0"),
    "max_sequence_length_past_rope": (dict(max_sequence_length=4096), ValueError, r"max_sequence_length=4096 exceeds the 1022 caption tokens"),
    "callback_not_callable": (dict(callback_on_step_end="print"), TypeError, r"callback_on_step_end must be callable, got str"),
    "callback_unknown_tensor_input": (dict(callback_on_step_end=never_called, callback_on_step_end_tensor_inputs=["prompt_embeds"]), ValueError, r"may name only \['latents'\], got \['prompt_embeds'\]"),
    "sigmas_out_of_range": (dict(sigmas=[1.0, 2.0]), ValueError, r"sigmas must be a non-empty list of numbers in \(0, 1\]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_message(pipe, case):
    changes, error, message = BAD_INPUTS[case]
    calls_before = pipe.telemetry.stats()["calls"]
    with pytest.raises(error, match=message):
        pipe(**{**GOOD, "callback_on_step_end": never_called, **changes})
    assert pipe.telemetry.stats()["calls"] == calls_before  # nothing was generated


def test_good_request_passes(pipe):
    """The baseline the bad cases change one thing of really runs."""
    assert tuple(pipe(**GOOD).images.shape) == (1, 16, 32, 32)


def test_prompt_longer_than_max_sequence_length_warns_with_dropped_count(pipe):
    prompt = "word " * 40  # 200 bytes; the tiny tokenizer has one token per byte
    tokens = len(pipe.tokenizer(pipe._prompts.chat_text(prompt)).input_ids)
    pipe._prompts.truncation_warned = False  # (it warns once per pipeline, and this one is shared)
    with pytest.warns(PromptTruncatedWarning, match=rf"prompt 0 is {tokens} tokens.*max_sequence_length=32.*last {tokens - 32} tokens were dropped"):
        out = pipe(**{**GOOD, "prompt": prompt, "max_sequence_length": 32})
    assert torch.isfinite(out.images).all()


def test_prompt_within_max_sequence_length_does_not_warn(pipe, recwarn):
    pipe(**{**GOOD, "max_sequence_length": 64})
    assert not [w for w in recwarn if issubclass(w.category, PromptTruncatedWarning)]


def test_bad_input_leaves_the_pipeline_usable(pipe):
    with pytest.raises(ValueError):
        pipe(**{**GOOD, "height": 100})
    assert tuple(pipe(**GOOD).images.shape) == (1, 16, 32, 32)
