"""zimage_trt: Z-Image-Turbo as fixed-shape compiled engines and a lean GPU runtime."""

__version__ = "0.1.0"

TASK_PIPELINES = ("ZImageTRTImg2ImgPipeline", "ZImageTRTInpaintPipeline", "ZImageTRTControlNetPipeline",
                  "ZImageTRTControlNetInpaintPipeline")
__all__ = ["build_engines", "StaticZImageDenoiser", "EngineNotFound", "open_denoiser", "Resolution", "ZImageTRTPipeline",
           *TASK_PIPELINES]


def __getattr__(name):
    # Each public name from the room that holds it, imported when first asked for: the pipeline pulls
    # in transformers and the build step onnx, so neither is paid for by a user of the other.
    if name == "ZImageTRTPipeline":
        from .pipeline import ZImageTRTPipeline

        return ZImageTRTPipeline
    if name in TASK_PIPELINES:
        from . import tasks

        return getattr(tasks, name)
    if name == "build_engines":
        from .compiler.build import build_engines

        return build_engines
    if name == "StaticZImageDenoiser":
        from .model.denoiser import StaticZImageDenoiser

        return StaticZImageDenoiser
    if name in ("EngineNotFound", "open_denoiser"):
        from .engines import select

        return getattr(select, name)
    if name == "Resolution":
        from .model.shapes import Resolution

        return Resolution
    raise AttributeError(f"module 'zimage_trt' has no attribute {name!r}")
