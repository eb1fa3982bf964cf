"""`zimage-trt serve`'s options and its one security rule, with nothing from the `serve` extra (so that the
CLI's parser is built without it installed).

The rule: the server listens on a loopback address unless an API key is set. Anyone who can reach a
public address could otherwise spend the GPU, so `check_bind` refuses to start and says why. And without
a key it answers only requests addressed to a loopback name (`allowed_host_names`).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from pathlib import Path

from ..model.precision import PRECISIONS, RUN_PRECISION_RULE

API_KEY_ENV = "ZIMAGE_TRT_API_KEY"
MIN_KEY_CHARS = 16
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServeConfigError(ValueError):
    """The server's options do not make a safe, working server; the message says what to change."""


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_host_names(api_key: str | None, host: str) -> tuple[str, ...] | None:
    """The Host header names a server listening on `host` answers: any (None) with an API key; without one
    only the loopback names and `host` itself. A web page whose own name is rebound to 127.0.0.1 (DNS
    rebinding) would otherwise reach the keyless API from a browser on this machine."""
    if api_key:
        return None
    return tuple(dict.fromkeys((*LOOPBACK_HOST_NAMES, host)))


def read_api_key(api_key_file: str | None, environ=os.environ) -> str | None:
    """The key from `api_key_file` (first line), else from $ZIMAGE_TRT_API_KEY, else None."""
    if api_key_file:
        path = Path(api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip().splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError, IndexError) as error:
            raise ServeConfigError(f"cannot read the API key file {api_key_file}: {error}") from None
        source = f"the API key file {api_key_file}"
    else:
        key = environ.get(API_KEY_ENV, "").strip()
        source = f"${API_KEY_ENV}"
        if not key:
            return None
    if len(key) < MIN_KEY_CHARS or any(ch.isspace() for ch in key):
        raise ServeConfigError(f"{source} holds a key of {len(key)} characters; use at least {MIN_KEY_CHARS} "
                               f"characters without spaces, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return key


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse a non-loopback address without an API key."""
    if api_key is None and not is_loopback(host):
        raise ServeConfigError(
            f"refusing to listen on {host} without an API key: anyone who can reach that address could use "
            f"this GPU. Pass --api-key-file FILE or set {API_KEY_ENV} (clients then send 'Authorization: "
            f"Bearer KEY'), or listen on {DEFAULT_HOST} (the default) behind your own proxy"
        )


def add_controlnet_arguments(ap, use: str) -> None:
    """--controlnet, --controlnet-config and --control-scale, as `generate` and `serve` take them; `use`: what
    --controlnet does in that command, and its default."""
    ap.add_argument("--controlnet", default=None, metavar="PATH",
                    help="a Z-Image ControlNet: a diffusers-format folder, a hub id, or one .safetensors file (Union "
                         f"v1 / 2.0 / 2.1); {use}")
    ap.add_argument("--controlnet-config", default=None,
                    help="for a .safetensors --controlnet: a folder or hub id with its config.json (default: the hub "
                         "repo diffusers names for its layout)")
    ap.add_argument("--control-scale", default="0.75",
                    help="ControlNet conditioning scale: a number, or one per control place, comma-separated "
                         "(noise-refiner places first, then layer places) (default: 0.75, diffusers')")


def control_scale(text: str) -> float | list[float]:
    """--control-scale: a number, or comma-separated numbers (one per control place)."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ServeConfigError(f"--control-scale {text!r}: write a number (0.75) or one per control place, "
                               f"comma-separated (0.5,0.75,1)")
    return values[0] if len(values) == 1 else values


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="diffusers-format Z-Image folder (or hub id); not needed with --tiny")
    ap.add_argument("--tiny", action="store_true",
                    help="serve a tiny random model made in memory (tests, demos; add --device cpu)")
    ap.add_argument("--engine-dir", default=None,
                    help="engine folder (the same --engine-dir in build, generate, bench and serve); without it "
                         "the eager static denoiser runs (slow on a GPU)")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help=f"engine precision to look for, and the pipeline's dtype (default: {RUN_PRECISION_RULE}; "
                         "the same rule as generate)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; unset: cuda when available")
    ap.add_argument("--size", action="append", default=None,
                    help="WIDTHxHEIGHT to serve (1344x768: 1344 wide, 768 tall); repeat for several; unset: every "
                         "size the engines in --engine-dir were built for, 1024x1024 without engines, 256x256 with "
                         "--tiny")
    ap.add_argument("--allow-fallback", action="store_true",
                    help="serve any size, running eager torch where no engine fits (slow)")
    ap.add_argument("--host", default=DEFAULT_HOST,
                    help="address to listen on; anything but loopback needs an API key")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    ap.add_argument("--api-key-file", default=None,
                    help=f"file whose first line is the API key clients send as a bearer token "
                         f"(unset: ${API_KEY_ENV}, else no key)")
    ap.add_argument("--max-queue", type=int, default=32, help="requests waiting; more are answered 429")
    ap.add_argument("--max-n", type=int, default=4, help="largest n (images per request)")
    ap.add_argument("--max-steps", type=int, default=50, help="largest num_inference_steps")
    ap.add_argument("--max-prompt-chars", type=int, default=4000, help="longest prompt, in characters")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="largest JSON request body without images")
    ap.add_argument("--max-upload-bytes", type=int, default=32 * 2**20,
                    help="largest request body with images: an edit's multipart form, a generation with a "
                         "control_image (with --controlnet)")
    ap.add_argument("--max-image-pixels", type=int, default=2**25,
                    help="most pixels of one uploaded image, read before it is decoded (default 2^25: 8192x4096)")
    add_controlnet_arguments(ap, "generations then take control_image, and edits with a mask take it too (a "
                                 "33-channel one) (default: none; control_image is refused)")
    ap.add_argument("--model-name", default="z-image-turbo",
                    help="the model id clients name in `model` and GET /v1/models lists")
    ap.add_argument("--url-max-images", type=int, default=64,
                    help="images kept in memory for response_format 'url' links (0: links refused; under --ray "
                         "links are refused: another replica may answer the link)")
    ap.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a 'url' link lasts")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds from arrival to the last image (queue wait included); later: 504")
    ap.add_argument("--not-ready-when-shared", action="store_true",
                    help="answer /readyz 503 (with the reason) while another process computes on the GPU, so a "
                         "load balancer sends traffic elsewhere; requests are still served")
    ap.add_argument("--sequence-parallel", type=int, default=1,
                    help="processes making each image together, one GPU each: under `torchrun --nproc-per-node N -m "
                         "zimage_trt.cli serve ... --sequence-parallel N` rank 0 serves HTTP and the others compute "
                         "their share of each image; with --ray each replica is such a group of N GPUs")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="server log level")
