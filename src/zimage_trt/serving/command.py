"""`run_server`: what `zimage-trt serve` runs — one pipeline, its service and app, under uvicorn.

SIGTERM / Ctrl-C: the waiting requests are answered 503 at once, the running one finishes, uvicorn
closes the connections, the app's shutdown closes the service, and the process exits 0.

With `--sequence-parallel N` under torchrun, every rank loads the pipeline; rank 0 serves HTTP as
above, the others run `pipe.serve()` (their share of each image) until rank 0 closes its pipeline at
shutdown, then exit 0 too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import uvicorn

from ..model.precision import precision_dtype, run_precision
from ..model.weights import is_hub_id
from ..parallel import check_launch
from ..pipeline import ZImageTRTPipeline
from ..testing.tiny import make_tiny_components
from .app import AppSettings, create_app
from .schema import ServingLimits
from .service import ImageService, ServiceSettings, served_sizes
from .family import CONTROLNET_NEEDS_ONE_GPU
from .settings import ServeConfigError, allowed_host_names, check_bind, control_scale, read_api_key

log = logging.getLogger("zimage_trt.serving")
TINY_SIZE = "256x256"


class _GracefulServer(uvicorn.Server):
    """uvicorn waits for open requests at a signal; we first answer the waiting ones 503, so that only
    the running request is waited for."""

    def __init__(self, config, service: ImageService):
        super().__init__(config)
        self._service = service

    def handle_exit(self, sig, frame) -> None:
        # A signal handler may interrupt a thread holding the service's lock: do the work in another.
        threading.Thread(target=self._service.begin_shutdown, name="zimage-trt-shutdown", daemon=True).start()
        # As uvicorn's, without re-raising the signal after the shutdown: a graceful stop exits 0.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def pipeline_factory(args):
    """A zero-argument function that loads the pipeline (called in the service's warm-up thread)."""
    precision = run_precision(args.precision, args.device, with_engines=args.engine_dir is not None)
    options = dict(device=args.device, allow_fallback=args.allow_fallback, torch_dtype=precision_dtype(precision),
                   precision=precision, sequence_parallel=getattr(args, "sequence_parallel", 1))
    if args.tiny:
        return lambda: ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), engine_dir=args.engine_dir,
                                                         **options)
    return lambda: ZImageTRTPipeline.from_pretrained(args.model, engine_dir=args.engine_dir, **options)


def build_service(args) -> ImageService:
    if not args.tiny and not args.model:
        raise ServeConfigError("pass --model DIR (a diffusers-format Z-Image folder), or --tiny for the test model")
    sizes = args.size
    if not sizes and args.engine_dir:
        sizes = served_sizes(args.engine_dir)
        if not sizes and not args.allow_fallback:
            raise ServeConfigError(f"no denoiser engine manifests (batch 1) in {args.engine_dir}; build engines "
                                   f"with `zimage-trt build`, or pass --size with --allow-fallback")
    if not sizes:
        sizes = [TINY_SIZE if args.tiny else "1024x1024"]
    limits = ServingLimits(sizes=tuple(sizes), any_size=args.allow_fallback, max_n=args.max_n,
                           max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
                           max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
                           max_image_pixels=args.max_image_pixels, model_id=args.model_name)
    if args.controlnet is not None and getattr(args, "sequence_parallel", 1) != 1:
        raise ServeConfigError(f"--controlnet with --sequence-parallel: {CONTROLNET_NEEDS_ONE_GPU}")
    if args.controlnet is not None and not Path(args.controlnet).exists() and not is_hub_id(args.controlnet):
        raise ServeConfigError(f"--controlnet {args.controlnet}: no such file or folder (a diffusers-format folder, "
                               f"one .safetensors file, or a hub id 'org/name')")
    settings = ServiceSettings(limits=limits, max_queue=args.max_queue, timeout_s=args.timeout,
                               not_ready_when_shared=args.not_ready_when_shared, controlnet=args.controlnet,
                               controlnet_config=args.controlnet_config, control_scale=control_scale(args.control_scale))
    return ImageService(pipeline_factory(args), settings)


def serving_app(service: ImageService, api_key: str | None, host: str, **app_settings):
    """The app `run_server` serves on `host`: the API key, and without one only loopback names answered;
    `app_settings`: the other AppSettings fields (image links)."""
    return create_app(service, AppSettings(api_key=api_key, allowed_hosts=allowed_host_names(api_key, host),
                                           **app_settings))


def run_server(args) -> int:
    api_key = read_api_key(args.api_key_file)
    check_bind(args.host, api_key)  # before anything is loaded: a refusal is immediate
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = build_service(args)  # (every rank checks the options: a bad one stops them all alike)
    if args.sequence_parallel != 1:
        check_launch(args.sequence_parallel)  # torchrun's variables, before anything loads
        if int(os.environ.get("RANK", "0")) != 0:
            return serve_share(args)
    app = serving_app(service, api_key, args.host, url_max_images=args.url_max_images, url_ttl_s=args.url_ttl)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.timeout + 30.0)
    server = _GracefulServer(config, service)
    log.info("serving on http://%s:%d (%s)", args.host, args.port, "API key required" if api_key else "no API key")
    server.run()
    return 0


def serve_share(args) -> int:
    """A rank other than 0 of `serve --sequence-parallel N`: its share of each image until rank 0 closes."""
    with pipeline_factory(args)() as pipe:
        log.info("rank %s of %d: serving rank 0's calls", os.environ.get("RANK"), args.sequence_parallel)
        served = pipe.serve()
    log.info("rank %s: rank 0 closed after %d call(s)", os.environ.get("RANK"), served)
    return 0
