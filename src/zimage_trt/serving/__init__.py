"""The HTTP service in front of one pipeline: `zimage-trt serve`.

- `settings.py`: the server's settings, its command-line options and the bind/API-key rule (stdlib only,
  so `zimage-trt --help` needs none of the `serve` extra);
- `schema.py`: the OpenAI-shaped request/response models and their 422 bodies (pydantic);
- `service.py`: `ImageService`, one pipeline and its `GenerationQueue`, async `generate` / `stream`;
- `family.py`: the task pipelines made from it with `from_pipe` (image to image, inpainting, ControlNet),
  which task a request runs; `edits.py`: POST /v1/images/edits' multipart form; `uploads.py`: uploaded
  images checked and decoded, the mask rule; `steps.py`: a request in the service and its step callback;
- `outcome.py`: the errors a client sees (`ServiceError`), the pipeline's checks before queueing, PNG/JSON;
- `metrics.py`: Prometheus metrics (prometheus-client), GPU readings through NVML;
- `app.py`: `create_app`, the ASGI app (FastAPI) with the dashboard (`dashboard.html`, `dashboard.js`);
- `command.py`: `run_server`, what `zimage-trt serve` runs (uvicorn, graceful SIGTERM);
- `ray_deployment.py`: the same app as a Ray Serve deployment, one replica per GPU (`zimage-trt serve --ray`,
  `serve run`), with `cluster_stats.py` merging the replicas' stats and metrics and `ray_settings.py` its
  options (the `ray` extra).

Everything but `settings` needs `pip install zimage_trt[serve]`; the names below are imported when first used.
"""

__all__ = ["create_app", "ImageService", "ServiceSettings", "ServingLimits", "ImageGenerationRequest", "run_server",
           "run_ray_server"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("ImageService", "ServiceSettings", "ServiceError"):
        from . import service

        return getattr(service, name)
    if name in ("ServingLimits", "ImageGenerationRequest"):
        from . import schema

        return getattr(schema, name)
    if name == "run_server":
        from .command import run_server

        return run_server
    if name == "run_ray_server":
        from .ray_deployment import run_ray_server

        return run_ray_server
    raise AttributeError(f"module 'zimage_trt.serving' has no attribute {name!r}")
