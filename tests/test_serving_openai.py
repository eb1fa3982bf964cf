"""The service as OpenAI's own Python client sees it: a real uvicorn server on 127.0.0.1 (a free port, in a
thread of this process), the tiny model on the CPU, and `openai.OpenAI(base_url=...)` making every call.

What a user of Open WebUI, LibreChat or a script gets: images for `images.generate` with our extras in
`extra_body`, WIDTHxHEIGHT sizes (a landscape image is wider than tall), OpenAI's optional fields taken,
every error raised as the client's own exception class carrying our message, OpenAI's streaming events
with partial images, links for `response_format="url"`, and the API key checked.
"""

from __future__ import annotations

import base64
import io

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from serving_server import running_app
from zimage_trt.serving.app import AppSettings, create_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings

KEY = "test-key-" + "x" * 16
SIZES = ("256x256", "384x256", "256x384")  # square, landscape, portrait (WIDTHxHEIGHT)
STEPS = 2
PROMPT = "a red fox in the snow"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def server(tiny_cpu_pipe):
    service = ImageService(tiny_cpu_pipe, ServiceSettings(limits=ServingLimits(sizes=SIZES), warm_steps=1))
    app = create_app(service, AppSettings(api_key=KEY))
    with running_app(app, service) as url:
        yield url, app, service


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    # No retries: a retried refusal would hide which answer came first; bounded in time.
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as made:
        yield made


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def solo(pipe, seed: int, height=256, width=256, steps=STEPS, **kwargs) -> np.ndarray:
    out = pipe(PROMPT, height=height, width=width, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return np.asarray(out.images[0], dtype=np.int16)


def close(served: np.ndarray, alone: np.ndarray) -> bool:
    # The same computation in another thread, through lossless PNG: at most one 8-bit level apart, in case
    # the CPU's math library splits the work differently.
    return served.shape == alone.shape and int(np.abs(served - alone).max()) <= 1


def test_generate_with_our_extras_in_extra_body(client, tiny_cpu_pipe):
    response = client.images.generate(model="z-image-turbo", prompt=PROMPT, size="256x256", n=2,
                                      extra_body={"seed": 11, "num_inference_steps": STEPS})
    assert len(response.data) == 2 and response.size == "256x256" and response.output_format == "png"
    for item, seed in zip(response.data, (11, 12)):
        assert close(pixels(png(item.b64_json)), solo(tiny_cpu_pipe, seed))
    usage = response.usage
    assert usage.output_tokens == 2 * (256 // 16) ** 2 and usage.input_tokens_details.text_tokens == usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # Guidance and a negative prompt, as a client sends them.
    guided = client.images.generate(prompt=PROMPT, size="256x256", extra_body={
        "seed": 5, "num_inference_steps": STEPS, "guidance_scale": 2.0, "negative_prompt": "blurry"})
    assert close(pixels(png(guided.data[0].b64_json)),
                 solo(tiny_cpu_pipe, 5, guidance_scale=2.0, negative_prompt="blurry"))


@pytest.mark.parametrize("size, width, height", [("384x256", 384, 256), ("256x384", 256, 384)])
def test_sizes_are_width_by_height(client, tiny_cpu_pipe, size, width, height):
    response = client.images.generate(prompt=PROMPT, size=size, extra_body={"seed": 3, "num_inference_steps": STEPS})
    image = png(response.data[0].b64_json)
    assert image.format == "PNG" and image.size == (width, height) and response.size == size
    assert close(pixels(image), solo(tiny_cpu_pipe, 3, height=height, width=width))


def test_openais_optional_fields_are_taken_and_change_nothing(client):
    extras = {"seed": 9, "num_inference_steps": STEPS}
    plain = client.images.generate(prompt=PROMPT, size="256x256", extra_body=extras)
    dressed = client.images.generate(prompt=PROMPT, size="256x256", quality="high", style="vivid", user="someone",
                                     moderation="low", background="opaque", safety_identifier="hash-1",
                                     response_format="b64_json", output_format="png", n=1, extra_body=extras)
    assert np.array_equal(pixels(png(plain.data[0].b64_json)), pixels(png(dressed.data[0].b64_json)))
    auto = client.images.generate(prompt=PROMPT, size="auto", background="auto", quality="auto", extra_body=extras)
    assert auto.size == SIZES[0] and np.array_equal(pixels(png(auto.data[0].b64_json)), pixels(png(plain.data[0].b64_json)))


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_compression(client, output_format, pil_format):
    extras = {"seed": 4, "num_inference_steps": STEPS}
    reference = png(client.images.generate(prompt=PROMPT, size="256x256", extra_body=extras).data[0].b64_json)

    def coarse(image):  # 8x8 block means: what lossy coding keeps (the tiny model draws noise-like detail)
        return pixels(image.convert("RGB").resize((32, 32), Image.BOX))

    sizes = {}
    for compression in (100, 10):
        response = client.images.generate(prompt=PROMPT, size="256x256", output_format=output_format,
                                          output_compression=compression, extra_body=extras)
        assert response.output_format == output_format
        data = base64.b64decode(response.data[0].b64_json)
        image = Image.open(io.BytesIO(data))
        assert image.format == pil_format and image.size == (256, 256)
        sizes[compression] = len(data)
        # Lossy, but the same picture: its block means close to the PNG's (quality 10 is coarse by design).
        assert np.abs(coarse(image) - coarse(reference)).mean() < (3 if compression == 100 else 12)
    assert sizes[10] < sizes[100]  # output_compression is honoured


def test_errors_are_the_clients_own_exceptions_with_our_message(client):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(prompt=PROMPT, size="1000x1000")
    error = refused.value
    assert error.status_code == 422 and (error.type, error.code, error.param) == (
        "invalid_request_error", "invalid_value", "size")
    assert "size: one of '256x256', '384x256', '256x384' or 'auto'" in error.body["message"]
    assert error.request_id == error.body["request_id"]  # X-Request-ID and the body agree
    with pytest.raises(openai.UnprocessableEntityError, match="this model makes opaque images"):
        client.images.generate(prompt=PROMPT, background="transparent")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(prompt=PROMPT, model="gpt-image-1")
    assert refused.value.param == "model" and "z-image-turbo" in refused.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="no such field"):
        client.images.generate(prompt=PROMPT, extra_body={"image_path": "/etc/passwd"})


def test_models_list_the_served_id(client):
    assert [model.id for model in client.models.list()] == ["z-image-turbo"]
    assert client.models.retrieve("z-image-turbo").owned_by == "zimage-trt"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-3")
    assert missing.value.code == "model_not_found" and "serves 'z-image-turbo'" in missing.value.body["message"]


def test_a_wrong_key_is_refused_and_the_right_one_taken(server, client):
    url, _, _ = server
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-" + "y" * 16, max_retries=0, timeout=60) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.images.generate(prompt=PROMPT)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert (refused.value.type, refused.value.code) == ("authentication_error", "invalid_api_key")
    assert "Authorization: Bearer KEY" in refused.value.body["message"]
    assert client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 1}).data[0].b64_json


def test_streaming_sends_partial_images_then_the_image(client, tiny_cpu_pipe):
    steps, seed = 4, 3
    events = list(client.images.generate(prompt=PROMPT, size="384x256", stream=True, partial_images=2,
                                         output_format="png", extra_body={"seed": seed, "num_inference_steps": steps}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    fields = {"type", "b64_json", "created_at", "size", "quality", "background", "output_format"}
    for index, event in enumerate(events[:2]):
        payload = event.model_dump()
        assert fields | {"partial_image_index"} <= set(payload), payload.keys()
        assert payload["partial_image_index"] == index and payload["size"] == "384x256"
        assert payload["quality"] == "auto" and payload["output_format"] == "png"
        # A preview at latent resolution: 1/8 of the image a side, landscape like it.
        assert png(event.b64_json).size == (384 // 8, 256 // 8)
    done = events[-1].model_dump()
    assert fields | {"usage"} <= set(done) and done["usage"]["output_tokens"] == (384 // 16) * (256 // 16)
    image = png(done["b64_json"])
    assert image.size == (384, 256)
    assert close(pixels(image), solo(tiny_cpu_pipe, seed, height=256, width=384, steps=steps))
    # partial_images 0: the image in one event.
    [only] = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=0,
                                         extra_body={"seed": seed, "num_inference_steps": 2}))
    assert only.type == "image_generation.completed" and png(only.b64_json).size == (256, 256)


def test_url_responses_link_to_the_image_behind_the_key(server, client):
    url, app, _ = server
    response = client.images.generate(prompt=PROMPT, size="256x384", response_format="url",
                                      extra_body={"seed": 6, "num_inference_steps": STEPS})
    link = response.data[0].url
    assert link.startswith(url + "/v1/images/files/") and response.data[0].b64_json is None
    fetched = httpx.get(link, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 384)
    keyless = httpx.get(link, timeout=60)
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    # Past its time the link is gone, answered in OpenAI's error shape.
    store = app.state.image_store
    real_clock = store.clock
    store.clock = lambda: real_clock() + store.ttl_s + 1
    try:
        gone = httpx.get(link, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    finally:
        store.clock = real_clock
    error = gone.json()["error"]
    assert gone.status_code == 404 and (error["type"], error["code"]) == ("invalid_request_error", "image_not_found")
    assert "response_format 'b64_json'" in error["message"] and error["request_id"] == gone.headers["x-request-id"]


def test_previews_over_the_budget_are_skipped_and_the_image_still_comes(client, server, monkeypatch):
    from zimage_trt.serving import previews

    _, _, service = server
    monkeypatch.setattr(previews, "BUDGET", 0.0)  # no time at all for previews, and one costs time ...
    monkeypatch.setattr(service.previewer, "cost_estimate_s", 0.001)
    events = list(client.images.generate(prompt=PROMPT, stream=True, partial_images=3,
                                         extra_body={"seed": 2, "num_inference_steps": 6}))
    assert [event.type for event in events] == ["image_generation.completed"]  # ... so none is made
