"""zimage_trt: Z-Image-Turbo as fixed-shape compiled engines and a lean GPU runtime."""

from .build import build_engines
from .denoiser import StaticZImageDenoiser
from .engines import EngineNotFound, open_denoiser
from .shapes import Resolution

__version__ = "0.1.0"

__all__ = ["build_engines", "StaticZImageDenoiser", "EngineNotFound", "open_denoiser", "Resolution", "ZImageTRTPipeline"]


def __getattr__(name):
    # The pipeline pulls in transformers; import it only when asked for.
    if name == "ZImageTRTPipeline":
        from .pipeline import ZImageTRTPipeline

        return ZImageTRTPipeline
    raise AttributeError(name)
