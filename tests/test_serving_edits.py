"""POST /v1/images/edits and the ControlNet route, as OpenAI's own Python client sees them: a real uvicorn
server on 127.0.0.1 (a thread of this process), the tiny model on the CPU, `client.images.edit(...)`.

An edit is the image the Python pipeline class makes with the same arguments and seed, compared exactly:
the same process, the same code path (the server decodes the same PNG bytes, and resizes with the same
image processor the class uses), so not one pixel may differ. Also: the mask's two conventions (OpenAI's
transparent = edit, diffusers' white = edit), `size: auto` and landscape sizes, streaming, and each refusal
(a wrong upload type, a decompression bomb, an oversized body, a mask of another size, no image, several
images, a wrong key, a form from another site's page), each in OpenAI's error shape; the task of each
request in the response, /v1/stats and /metrics. The ControlNet route: a server started with a tiny
ControlNet (random values in its zero-initialised projections, so its hints are not zero) takes
`control_image` on generations, and on edits with a mask (ControlNet inpainting).
"""

from __future__ import annotations

import base64
import copy
import io
import struct
import zlib

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from serving_server import running_app
from zimage_trt import (
    ZImageTRTControlNetInpaintPipeline,
    ZImageTRTControlNetPipeline,
    ZImageTRTImg2ImgPipeline,
    ZImageTRTInpaintPipeline,
)
from zimage_trt.serving.command import serving_app
from zimage_trt.serving.schema import ServingLimits
from zimage_trt.serving.service import ImageService, ServiceSettings
from zimage_trt.testing.tiny import make_tiny_controlnet

KEY = "edit-key-" + "x" * 16
SIZES = ("256x256", "384x256", "256x384")  # square, landscape, portrait (WIDTHxHEIGHT)
STEPS = 4
PROMPT = "a lighthouse at dusk"
MAX_UPLOAD = 400_000  # bytes: the noise pictures below are ~200 KB as PNG, the big one ~790 KB
MAX_PIXELS = 400 * 400

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def picture(seed: int, size=(256, 256)) -> Image.Image:
    """Blocks of colour, resized: image-like, and different per seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


def noise(seed: int, size=(256, 256)) -> Image.Image:
    """Pixel noise: a PNG that does not compress (for the body limit)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def upload(image: Image.Image, name: str = "image.png", fmt: str = "PNG"):
    """What `open(path, "rb")` hands the client: (file name, bytes, type)."""
    return (name, encoded(image, fmt), f"image/{fmt.lower()}")


def transparent_window(size=(256, 256), box=(64, 96, 192, 224)) -> Image.Image:
    """OpenAI's mask: opaque everywhere but a fully transparent window (where to edit)."""
    mask = Image.new("RGBA", size, (20, 20, 20, 255))
    mask.paste((20, 20, 20, 0), box)
    return mask


def white_window(size=(256, 256), box=(64, 96, 192, 224)) -> Image.Image:
    """diffusers' mask for the same window: white = repaint."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def decoded(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def same_file_decoded(image: Image.Image, fmt: str = "PNG") -> Image.Image:
    """The image as the server gets it: encoded, then decoded by Pillow (RGB)."""
    return Image.open(io.BytesIO(encoded(image, fmt))).convert("RGB")


def alone(task_pipe, seed: int, steps: int = STEPS, **kwargs) -> np.ndarray:
    """The Python class's image for `seed`, drawn as the service draws it: a generator on the pipeline's
    device (on CUDA a CPU generator would draw other noise)."""
    generator = torch.Generator(task_pipe.device).manual_seed(seed)
    out = task_pipe(PROMPT, num_inference_steps=steps, generator=generator, **kwargs)
    return np.asarray(out.images[0])


def start(pipe, **settings):
    limits = ServingLimits(sizes=SIZES, max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS)
    service = ImageService(pipe, ServiceSettings(limits=limits, warm_steps=1, **settings))
    return service, running_app(serving_app(service, KEY, "127.0.0.1"), service)


@pytest.fixture(scope="module")
def server(tiny_cpu_pipe):
    service, running = start(tiny_cpu_pipe)
    with running as url:
        yield url, service


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as made:
        yield made


# -- image to image and inpainting: the Python class's image -----------------------------------------
def test_image_to_image_is_the_python_pipelines_image(client, tiny_cpu_pipe):
    source = picture(1)
    response = client.images.edit(image=upload(source), prompt=PROMPT, size="256x256",
                                  extra_body={"seed": 5, "num_inference_steps": STEPS, "strength": 0.5})
    reference = ZImageTRTImg2ImgPipeline.from_pipe(tiny_cpu_pipe)
    expected = alone(reference, 5, image=same_file_decoded(source), strength=0.5, height=256, width=256)
    assert np.array_equal(decoded(response.data[0].b64_json), expected)
    assert response.size == "256x256" and response.model_extra["task"] == "image-to-image"
    assert len(response.model_extra["timings"]["step_ms"]) == 2  # strength 0.5 of 4 steps runs the last 2
    assert response.usage.input_tokens_details.image_tokens == (256 // 16) ** 2  # the image, as the model sees it
    # By link (response_format "url"), behind the key, as a generation's.
    linked = client.images.edit(image=upload(source), prompt=PROMPT, size="256x256", response_format="url",
                                extra_body={"seed": 5, "num_inference_steps": STEPS, "strength": 0.5})
    fetched = httpx.get(linked.data[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert fetched.status_code == 200 and np.array_equal(decoded(base64.b64encode(fetched.content)), expected)
    # No strength: diffusers' 0.6; n = 2 runs seeds 7 and 8; a JPEG upload is taken too.
    two = client.images.edit(image=upload(source, "image.jpg", "JPEG"), prompt=PROMPT, n=2, size="256x256",
                             extra_body={"seed": 7, "num_inference_steps": STEPS})
    for item, seed in zip(two.data, (7, 8)):
        assert np.array_equal(decoded(item.b64_json), alone(reference, seed, image=same_file_decoded(source, "JPEG"),
                                                            height=256, width=256))
    assert not np.array_equal(decoded(two.data[0].b64_json), decoded(two.data[1].b64_json))


def test_inpainting_takes_openais_transparent_mask_and_a_greyscale_one(client, tiny_cpu_pipe):
    source = picture(2)
    reference = ZImageTRTInpaintPipeline.from_pipe(tiny_cpu_pipe)
    expected = alone(reference, 3, image=same_file_decoded(source), mask_image=white_window(), height=256, width=256)
    extras = {"seed": 3, "num_inference_steps": STEPS}
    # OpenAI's convention: the transparent window is what gets edited.
    openai_style = client.images.edit(image=upload(source), mask=upload(transparent_window(), "mask.png"),
                                      prompt=PROMPT, size="256x256", extra_body=extras)
    assert openai_style.model_extra["task"] == "inpaint"
    assert np.array_equal(decoded(openai_style.data[0].b64_json), expected)
    # diffusers' convention, for a mask without transparency: white is what gets edited.
    greyscale = client.images.edit(image=upload(source), mask=upload(white_window(), "mask.png"), prompt=PROMPT,
                                   size="256x256", extra_body=extras)
    assert np.array_equal(decoded(greyscale.data[0].b64_json), expected)
    # An alpha channel opaque everywhere says nothing: its greyscale is read (white window = edit).
    opaque = white_window().convert("RGBA")
    same = client.images.edit(image=upload(source), mask=upload(opaque, "mask.png"), prompt=PROMPT, size="256x256",
                              extra_body=extras)
    assert np.array_equal(decoded(same.data[0].b64_json), expected)
    # The other window repaints elsewhere: the mask is read, not ignored.
    elsewhere = client.images.edit(image=upload(source), mask=upload(transparent_window(box=(0, 0, 96, 96)), "m.png"),
                                   prompt=PROMPT, size="256x256", extra_body=extras)
    assert not np.array_equal(decoded(elsewhere.data[0].b64_json), expected)


def test_sizes_are_width_by_height_and_auto_is_the_images_own(client, tiny_cpu_pipe):
    reference = ZImageTRTImg2ImgPipeline.from_pipe(tiny_cpu_pipe)
    extras = {"seed": 4, "num_inference_steps": STEPS}
    landscape = picture(3, (384, 256))
    auto = client.images.edit(image=upload(landscape), prompt=PROMPT, extra_body=extras)  # size: OpenAI's default auto
    assert auto.size == "384x256"
    image = decoded(auto.data[0].b64_json)
    assert image.shape == (256, 384, 3)  # 384 wide, 256 tall
    assert np.array_equal(image, alone(reference, 4, image=same_file_decoded(landscape), height=256, width=384))
    portrait = client.images.edit(image=upload(picture(3, (256, 384))), prompt=PROMPT, size="auto", extra_body=extras)
    assert portrait.size == "256x384" and decoded(portrait.data[0].b64_json).shape == (384, 256, 3)
    # Not a served size: the served one nearest its aspect ratio (300x200 is 3:2, as 384x256).
    assert client.images.edit(image=upload(picture(3, (300, 200))), prompt=PROMPT, extra_body=extras).size == "384x256"
    # A size asked for: the image is resized to it, as the class resizes it.
    square = picture(5)
    wide = client.images.edit(image=upload(square), prompt=PROMPT, size="384x256", extra_body=extras)
    assert np.array_equal(decoded(wide.data[0].b64_json),
                          alone(reference, 4, image=same_file_decoded(square), height=256, width=384))


def test_a_streamed_edit_sends_partial_images_then_the_same_image(client, server):
    extras = {"seed": 9, "num_inference_steps": 6, "strength": 0.5}  # 3 steps run: one preview fits
    source = upload(picture(6))
    plain = client.images.edit(image=source, prompt=PROMPT, size="256x256", extra_body=extras)
    events = list(client.images.edit(image=source, prompt=PROMPT, size="256x256", stream=True, partial_images=1,
                                     extra_body=extras))
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).size == (256 // 8, 256 // 8)
    assert np.array_equal(decoded(events[-1].b64_json), decoded(plain.data[0].b64_json))
    # Our progress events (the dashboard's ?stream=true) for an edit: the steps it runs, then the same image.
    url, _ = server
    progress = httpx.post(url + "/v1/images/edits?stream=true", headers={"Authorization": f"Bearer {KEY}"},
                          files={"image": source}, timeout=120,
                          data={"prompt": PROMPT, "size": "256x256", **{k: str(v) for k, v in extras.items()}})
    names = [line.split(":", 1)[1].strip() for line in progress.text.splitlines() if line.startswith("event:")]
    assert names == ["queued", "started", "step", "step", "step", "done"], names
    queued = next(line for line in progress.text.splitlines() if line.startswith("data:"))
    assert '"task": "image-to-image"' in queued and '"steps": 3' in queued


def test_the_task_of_each_request_is_in_stats_and_metrics(client, server, tiny_cpu_pipe):
    url, service = server
    client.images.generate(prompt=PROMPT, size="256x256", extra_body={"num_inference_steps": 1})
    client.images.edit(image=upload(picture(7)), prompt=PROMPT, extra_body={"num_inference_steps": 2})
    client.images.edit(image=upload(picture(7)), mask=upload(white_window(), "m.png"), prompt=PROMPT,
                       extra_body={"num_inference_steps": 2})
    headers = {"Authorization": f"Bearer {KEY}"}
    stats = httpx.get(url + "/v1/stats", headers=headers, timeout=60).json()
    assert stats["tasks"]["served"] == ["text-to-image", "image-to-image", "inpaint"]
    recent = [entry["task"] for entry in stats["recent"]][-3:]
    assert recent == ["text-to-image", "image-to-image", "inpaint"]
    assert {"text-to-image", "image-to-image", "inpaint"} <= set(stats["tasks"]["recent"])
    metrics = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    for task in ("text-to-image", "image-to-image", "inpaint"):
        assert f'zimage_task_requests_total{{task="{task}"}}' in metrics
    # The family shares one scheduler: after the edits (a cut schedule, a blend), text to image is its own.
    after = client.images.generate(prompt=PROMPT, size="256x256", extra_body={"seed": 4, "num_inference_steps": 2})
    assert after.model_extra["task"] == "text-to-image"
    assert np.array_equal(decoded(after.data[0].b64_json), alone(tiny_cpu_pipe, 4, steps=2, height=256, width=256))


# -- refusals --------------------------------------------------------------------------------------
def test_an_upload_that_is_not_png_jpeg_or_webp_is_refused(client):
    gif = encoded(picture(1).convert("P"), "GIF")
    for name, data in (("notes.txt", b"a lighthouse, please"), ("image.gif", gif), ("empty.png", b"")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(image=(name, data, "image/png"), prompt=PROMPT)
        error = refused.value
        assert (error.status_code, error.code, error.param) == (400, "invalid_image_format", "image"), name
        assert "PNG, JPEG or WebP" in error.body["message"]
    # A PNG's signature and then nothing sensible: Pillow cannot decode it.
    with pytest.raises(openai.BadRequestError) as broken:
        client.images.edit(image=("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"), prompt=PROMPT)
    assert broken.value.code == "invalid_image"
    # A WebP is taken.
    assert client.images.edit(image=upload(picture(1), "i.webp", "WEBP"), prompt=PROMPT,
                              extra_body={"num_inference_steps": 1}).size == "256x256"


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, and a tiny (truncated) body: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_too_many_pixels_and_too_many_bytes_are_refused(client):
    # A header claiming more pixels than the server takes is refused before anything is decoded: over our
    # bound, and far over it (Pillow's own bound then stops it at open).
    for width, height, said in ((500, 400, "500x400"), (60_000, 60_000, "3600000000 pixels")):
        with pytest.raises(openai.BadRequestError) as bomb:
            client.images.edit(image=("bomb.png", bomb_png(width, height), "image/png"), prompt=PROMPT)
        assert (bomb.value.code, bomb.value.param) == ("image_too_large", "image")
        assert said in bomb.value.body["message"] and f"at most {MAX_PIXELS} pixels" in bomb.value.body["message"]
    big = encoded(noise(1, (512, 512)))
    assert len(big) > MAX_UPLOAD
    with pytest.raises(openai.APIStatusError) as too_large:
        client.images.edit(image=("big.png", big, "image/png"), prompt=PROMPT)
    assert too_large.value.status_code == 413 and too_large.value.code == "body_too_large"
    assert f"over {MAX_UPLOAD} bytes" in too_large.value.body["message"]
    # Under the limit, the same kind of picture is taken.
    small = encoded(noise(2, (256, 256)))
    assert len(small) < MAX_UPLOAD
    assert client.images.edit(image=("small.png", small, "image/png"), prompt=PROMPT,
                              extra_body={"num_inference_steps": 1}).data[0].b64_json


def test_a_mask_of_another_size_no_image_and_several_images_are_refused(client, server):
    with pytest.raises(openai.BadRequestError) as other_size:
        client.images.edit(image=upload(picture(1)), mask=upload(white_window((384, 256)), "m.png"), prompt=PROMPT)
    error = other_size.value
    assert error.param == "mask" and "mask is 384x256 but image is 256x256" in error.body["message"]
    with pytest.raises(openai.BadRequestError) as several:
        client.images.edit(image=[upload(picture(1)), upload(picture(2))], prompt=PROMPT)
    assert several.value.param == "image" and "one image a request" in several.value.body["message"]
    # OpenAI's array with one image is the image.
    one = client.images.edit(image=[upload(picture(1))], prompt=PROMPT, extra_body={"num_inference_steps": 1})
    assert one.model_extra["task"] == "image-to-image"
    url, _ = server
    missing = httpx.post(url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                         data={"prompt": PROMPT}, files={"mask": ("m.png", encoded(white_window()), "image/png")})
    body = missing.json()["error"]
    assert missing.status_code == 422 and body["param"] == "image" and "image is required" in body["message"]
    assert body["request_id"] == missing.headers["x-request-id"]
    with pytest.raises(openai.UnprocessableEntityError) as no_prompt_steps:
        client.images.edit(image=upload(picture(1)), prompt=PROMPT, extra_body={"strength": 0})
    assert no_prompt_steps.value.param == "strength" and "leaves no denoising step" in no_prompt_steps.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="no such field"):
        client.images.edit(image=upload(picture(1)), prompt=PROMPT, extra_body={"style": "vivid"})


def test_a_wrong_key_a_json_body_and_another_sites_form_are_refused(server, client):
    url, _ = server
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-" + "y" * 16, max_retries=0, timeout=60) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.images.edit(image=upload(picture(1)), prompt=PROMPT)
    assert refused.value.code == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    as_json = httpx.post(url + "/v1/images/edits", headers=headers, json={"prompt": PROMPT}, timeout=60)
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]["message"]
    files = {"image": ("i.png", encoded(picture(1)), "image/png")}
    foreign = httpx.post(url + "/v1/images/edits", headers={**headers, "Origin": "http://evil.example"},
                         data={"prompt": PROMPT}, files=files, timeout=60)
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_origin"
    own = httpx.post(url + "/v1/images/edits", headers={**headers, "Origin": url}, files=files, timeout=60,
                     data={"prompt": PROMPT, "num_inference_steps": "1"})
    assert own.status_code == 200, own.text


def test_without_a_controlnet_control_image_is_refused(client):
    control = base64.b64encode(encoded(picture(1))).decode()
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(prompt=PROMPT, extra_body={"control_image": control})
    assert refused.value.param == "control_image" and "--controlnet" in refused.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="--controlnet"):
        client.images.edit(image=upload(picture(1)), mask=upload(white_window(), "m.png"), prompt=PROMPT,
                           extra_body={"control_image": control})


# -- the ControlNet route --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet():
    # Union 2.x-like: noise-refiner places and 33 control channels (it inpaints too).
    return make_tiny_controlnet(seed=8, variant="control_noise_refiner", control_in_dim=33)


@pytest.fixture(scope="module")
def control_client(tiny_cpu_pipe, controlnet):
    service, running = start(tiny_cpu_pipe, controlnet=controlnet, control_scale=0.75)
    with running as url:
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as made:
            yield made, service


def test_generations_with_a_control_image_run_the_controlnet(control_client, tiny_cpu_pipe, controlnet):
    client, service = control_client
    assert service.family.tasks == ("text-to-image", "image-to-image", "inpaint", "controlnet", "controlnet-inpaint")
    control = picture(11, (384, 256))
    reference = ZImageTRTControlNetPipeline.from_pipe(tiny_cpu_pipe, controlnet=controlnet)
    expected = alone(reference, 6, control_image=same_file_decoded(control), controlnet_conditioning_scale=0.75,
                     height=256, width=384)
    response = client.images.generate(prompt=PROMPT, size="384x256", extra_body={
        "seed": 6, "num_inference_steps": STEPS, "control_image": base64.b64encode(encoded(control)).decode()})
    assert response.model_extra["task"] == "controlnet"
    assert np.array_equal(decoded(response.data[0].b64_json), expected)
    # The hints change the image: without the control image, text to image.
    plain = client.images.generate(prompt=PROMPT, size="384x256", extra_body={"seed": 6, "num_inference_steps": STEPS})
    assert plain.model_extra["task"] == "text-to-image"
    assert not np.array_equal(decoded(plain.data[0].b64_json), expected)
    # A data: URL is taken; text that is not base64 is a 422.
    url = "data:image/png;base64," + base64.b64encode(encoded(control)).decode()
    again = client.images.generate(prompt=PROMPT, size="384x256", extra_body={
        "seed": 6, "num_inference_steps": STEPS, "control_image": url})
    assert np.array_equal(decoded(again.data[0].b64_json), expected)
    with pytest.raises(openai.UnprocessableEntityError, match="not base64"):
        client.images.generate(prompt=PROMPT, extra_body={"control_image": "not an image!"})


def test_an_edit_with_a_mask_and_a_control_image_is_controlnet_inpainting(control_client, tiny_cpu_pipe, controlnet):
    client, _ = control_client
    source, control = picture(12), picture(13)
    reference = ZImageTRTControlNetInpaintPipeline.from_pipe(tiny_cpu_pipe, controlnet=controlnet)
    expected = alone(reference, 2, image=same_file_decoded(source), mask_image=white_window(),
                     control_image=same_file_decoded(control), controlnet_conditioning_scale=0.75, height=256, width=256)
    response = client.images.edit(image=upload(source), mask=upload(transparent_window(), "m.png"), prompt=PROMPT,
                                  extra_body={"seed": 2, "num_inference_steps": STEPS,
                                              "control_image": base64.b64encode(encoded(control)).decode()})
    assert response.model_extra["task"] == "controlnet-inpaint"
    assert np.array_equal(decoded(response.data[0].b64_json), expected)
    assert response.usage.input_tokens_details.image_tokens == 2 * (256 // 16) ** 2  # the image and the control
    # The control image as a third file of the form does the same.
    files = {"image": upload(source), "mask": upload(transparent_window(), "m.png"), "control_image": upload(control)}
    as_file = httpx.post(str(client.base_url) + "images/edits", headers={"Authorization": f"Bearer {KEY}"}, files=files,
                         data={"prompt": PROMPT, "seed": "2", "num_inference_steps": str(STEPS)}, timeout=120)
    assert as_file.status_code == 200, as_file.text
    assert np.array_equal(decoded(as_file.json()["data"][0]["b64_json"]), expected)
    with pytest.raises(openai.UnprocessableEntityError, match="needs a mask"):
        client.images.edit(image=upload(source), prompt=PROMPT,
                           extra_body={"control_image": base64.b64encode(encoded(control)).decode()})
    with pytest.raises(openai.UnprocessableEntityError, match="strength is not taken"):
        client.images.edit(image=upload(source), mask=upload(white_window(), "m.png"), prompt=PROMPT,
                           extra_body={"strength": 0.5, "control_image": base64.b64encode(encoded(control)).decode()})


def test_warm_up_runs_every_served_task_at_every_size_before_ready(tiny_cpu_pipe, controlnet, monkeypatch):
    from zimage_trt.serving.family import PipelineFamily

    ran = []
    run = PipelineFamily.run

    def recorded(self, task, images, prompt, **call):
        ran.append((task, f"{call['width']}x{call['height']}", call["num_inference_steps"], self.pipes[task]))
        return run(self, task, images, prompt, **call)

    monkeypatch.setattr(PipelineFamily, "run", recorded)
    sizes = ("256x256", "384x256")
    service = ImageService(tiny_cpu_pipe, ServiceSettings(limits=ServingLimits(sizes=sizes), warm_steps=1,
                                                          controlnet=controlnet))
    service.start(background=False)
    assert service.ready
    tasks = ("image-to-image", "inpaint", "controlnet", "controlnet-inpaint")
    assert sorted((task, size, steps) for task, size, steps, _ in ran) == sorted(
        (task, size, 1) for task in tasks for size in sizes)
    # Each task by its own class, all over the one pipeline's parts and engines.
    classes = {task: type(pipe) for task, _, _, pipe in ran}
    assert classes == {"image-to-image": ZImageTRTImg2ImgPipeline, "inpaint": ZImageTRTInpaintPipeline,
                       "controlnet": ZImageTRTControlNetPipeline, "controlnet-inpaint": ZImageTRTControlNetInpaintPipeline}
    assert all(pipe.transformer is tiny_cpu_pipe.transformer and pipe._loops is tiny_cpu_pipe._loops
               for _, _, _, pipe in ran)
    service.close()


def test_serve_takes_a_controlnet_folder_and_checks_its_options(tmp_path, controlnet):
    import argparse

    from zimage_trt.serving.command import build_service, control_scale
    from zimage_trt.serving.settings import ServeConfigError, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    folder = tmp_path / "controlnet"
    controlnet.save_pretrained(folder)  # a diffusers-format folder (config.json + safetensors)
    args = parser.parse_args(["--tiny", "--device", "cpu", "--controlnet", str(folder), "--control-scale", "0.5",
                              "--max-upload-bytes", "1000000"])
    service = build_service(args)
    assert service.takes_control_images and service.settings.control_scale == 0.5
    assert service.limits.max_upload_bytes == 1_000_000
    service.settings.warm_steps = 1
    service.start(background=False)
    assert service.ready and "controlnet-inpaint" in service.family.tasks
    loaded = service.family.pipes["controlnet"].controlnet
    assert loaded is not controlnet and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                                 controlnet.state_dict().values()))
    service.close()
    assert control_scale("0.5,0.75,1") == [0.5, 0.75, 1.0]
    for bad in ("strong", "nan", "0.5,,1"):
        with pytest.raises(ServeConfigError, match="--control-scale"):
            control_scale(bad)
    with pytest.raises(ServeConfigError, match="no such file or folder"):
        build_service(parser.parse_args(["--tiny", "--device", "cpu", "--controlnet", str(tmp_path / "missing")]))
    # A hub id is not a missing path: it is loaded (downloaded) when the server starts, as generate's is.
    hub = build_service(parser.parse_args(["--tiny", "--device", "cpu", "--controlnet", "some-org/z-image-controlnet"]))
    assert hub.settings.controlnet == "some-org/z-image-controlnet"
    hub.close()


def test_the_mask_rule_and_auto_sizes():
    from zimage_trt.serving.edits import auto_size
    from zimage_trt.serving.uploads import repaint_mask

    # OpenAI's: alpha 0 -> repaint (255), alpha 255 -> keep (0); half-transparent pixels fall on either side.
    alpha = Image.new("RGBA", (4, 1), (255, 255, 255, 255))
    for x, a in enumerate((0, 100, 200, 255)):
        alpha.putpixel((x, 0), (255, 255, 255, a))
    mask, rule = repaint_mask(alpha)
    assert rule == "alpha" and np.asarray(mask).ravel().tolist() == [255, 155, 55, 0]
    # diffusers': no transparency, the greyscale itself (white = repaint), whatever the colour channels.
    grey, rule = repaint_mask(Image.new("RGB", (2, 1), (255, 255, 255)))
    assert rule == "greyscale" and np.asarray(grey).ravel().tolist() == [255, 255]
    fixed = ServingLimits(sizes=SIZES)
    assert [auto_size(w, h, fixed) for w, h in ((256, 256), (1920, 1080), (1080, 1920), (1000, 990))] == [
        "256x256", "384x256", "256x384", "256x256"]
    anything = ServingLimits(sizes=("512x512",), any_size=True)
    assert auto_size(300, 200, anything) == "288x192"  # its own size, rounded down to multiples of 16
    assert auto_size(4000, 3000, anything) == "576x432"  # scaled to at most 512x512's area, aspect kept


@pytest.mark.gpu
def test_edits_and_the_controlnet_on_a_gpu_are_the_python_classes_images(controlnet):
    """The same routes on CUDA (the tiny model, the eager engine's captured step graphs, the worker's step
    syncs for a streamed edit, previews read at the skipped steps' sigmas)."""
    from zimage_trt import ZImageTRTPipeline
    from zimage_trt.testing.tiny import make_tiny_components

    pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device="cuda")
    pipe.set_progress_bar_config(disable=True)
    service, running = start(pipe, controlnet=copy.deepcopy(controlnet))  # (the CPU tests' one stays on the CPU)

    def near(served: np.ndarray, expected: np.ndarray) -> bool:
        # The same computation in the server's worker thread: at most one 8-bit level apart, should a GPU
        # kernel split a reduction otherwise between the two calls.
        return served.shape == expected.shape and int(np.abs(served.astype(int) - expected.astype(int)).max()) <= 1

    with running as url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        source, control = picture(21, (384, 256)), picture(22, (384, 256))
        edited = client.images.edit(image=upload(source), prompt=PROMPT,
                                    extra_body={"seed": 1, "num_inference_steps": STEPS, "strength": 0.6})
        assert edited.size == "384x256"
        expected = alone(ZImageTRTImg2ImgPipeline.from_pipe(pipe), 1, image=same_file_decoded(source), strength=0.6,
                         height=256, width=384)
        assert near(decoded(edited.data[0].b64_json), expected)
        mask = transparent_window((384, 256), (100, 40, 300, 200))
        events = list(client.images.edit(image=upload(source), mask=upload(mask, "m.png"), prompt=PROMPT, stream=True,
                                         partial_images=2, extra_body={"seed": 2, "num_inference_steps": 6}))
        # On CUDA the tiny model's steps are so quick that the previews' 5% time bound may drop one: OpenAI's
        # rule too ("the final image may be sent before the full number of partial images").
        kinds = [event.type for event in events]
        assert kinds[-1] == "image_edit.completed" and 1 <= len(kinds) - 1 <= 2
        assert set(kinds[:-1]) == {"image_edit.partial_image"}
        expected = alone(ZImageTRTInpaintPipeline.from_pipe(pipe), 2, steps=6, image=same_file_decoded(source),
                         mask_image=white_window((384, 256), (100, 40, 300, 200)), height=256, width=384)
        assert near(decoded(events[-1].b64_json), expected)
        posed = client.images.generate(prompt=PROMPT, size="384x256", extra_body={
            "seed": 3, "num_inference_steps": STEPS, "control_image": base64.b64encode(encoded(control)).decode()})
        reference = ZImageTRTControlNetPipeline.from_pipe(pipe, controlnet=service.family.pipes["controlnet"].controlnet)
        expected = alone(reference, 3, control_image=same_file_decoded(control), controlnet_conditioning_scale=0.75,
                         height=256, width=384)
        assert posed.model_extra["task"] == "controlnet" and near(decoded(posed.data[0].b64_json), expected)
    pipe.close()
