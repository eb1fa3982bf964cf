"""Timing history and GPU samples: how fast, and how steady, generation is.

`Telemetry` keeps the timings of the last N generations in a bounded deque and summarises them with
mean, std, p50, p95 and the coefficient of variation (std / mean): a latency that wanders shows up as
a high CV long before it shows in the mean.

GPU samples (SM clock, temperature, power, memory used, utilisation) come from NVML through
`pynvml` (the `nvidia-ml-py` package) when it imports and a CUDA device exists; otherwise they are
silently left out. NVML failures never reach the caller: telemetry must not break generation.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# The stages every generation reports, in the order they run.
STAGES = ("text_encode_ms", "vae_encode_ms", "denoise_ms", "vae_decode_ms", "total_ms")
# Present only for requests that went through the GenerationQueue.
QUEUE_STAGES = ("queue_wait_ms", "run_ms")


@dataclass
class Timings:
    """Wall-clock milliseconds of one pipeline call (all its images together)."""

    text_encode_ms: float = 0.0
    vae_encode_ms: float = 0.0  # the input images (image to image, inpainting, ControlNet); 0 for text to image
    denoise_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    vae_decode_ms: float = 0.0
    total_ms: float = 0.0
    num_images: int = 1
    queue_wait_ms: float | None = None  # time between submit() and the worker starting the request
    run_ms: float | None = None  # time the worker spent on the request
    task: str = "text-to-image"  # which pipeline class ran it (tasks/: image-to-image, inpaint, controlnet, ...)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values) -> dict[str, float]:
    """count, mean, std (population), p50, p95 (linear interpolation) and cv = std / mean."""
    data = sorted(float(v) for v in values)
    count = len(data)
    if count == 0:
        return {"count": 0, "mean": math.nan, "std": math.nan, "p50": math.nan, "p95": math.nan, "cv": math.nan}
    mean = sum(data) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / count)
    return {
        "count": count,
        "mean": mean,
        "std": std,
        "p50": _percentile(data, 50.0),
        "p95": _percentile(data, 95.0),
        "cv": std / mean if mean else math.nan,
    }


def _percentile(sorted_data: list[float], pct: float) -> float:
    position = (len(sorted_data) - 1) * pct / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_data) - 1)
    return sorted_data[low] + (sorted_data[high] - sorted_data[low]) * (position - low)


class GpuSampler:
    """Reads one NVML sample of a CUDA device; `available` is False when NVML or the GPU is absent."""

    def __init__(self, device: torch.device | str | None):
        self._nvml = None
        self._handle = None
        self.gpu_name: str | None = None
        device = torch.device(device) if device is not None else None
        if device is None or device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = nvml_handle(pynvml, device)
            self.gpu_name = _as_str(pynvml.nvmlDeviceGetName(self._handle))
            self._nvml = pynvml
        except Exception:  # no pynvml, no driver, no such GPU: telemetry is optional
            self._nvml = self._handle = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> dict[str, float]:
        """The current readings; each reading the GPU refuses is left out."""
        if not self.available:
            return {}
        nvml, handle = self._nvml, self._handle
        readers = {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "memory_used_mib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        }
        readings = {}
        for name, read in readers.items():
            try:
                readings[name] = float(read())
            except Exception:  # e.g. power readings are not supported on some boards
                continue
        return readings


def nvml_handle(pynvml, device: torch.device):
    """NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so find ours by UUID; fall back to the index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Telemetry:
    """Bounded history of per-call timings (and GPU samples), summarised by `stats()`. Thread-safe."""

    def __init__(self, device: torch.device | str | None = None, history: int = 1000, sample_gpu: bool = True):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self._timings: deque[Timings] = deque(maxlen=history)
        self._gpu_samples: deque[dict[str, float]] = deque(maxlen=history)
        self._lock = threading.Lock()
        self._sampler = GpuSampler(device) if sample_gpu else GpuSampler(None)

    def record(self, timings: Timings) -> None:
        sample = self._sampler.sample()
        with self._lock:
            self._timings.append(timings)
            if sample:
                self._gpu_samples.append(sample)

    def clear(self) -> None:
        with self._lock:
            self._timings.clear()
            self._gpu_samples.clear()

    @property
    def history(self) -> list[Timings]:
        with self._lock:
            return list(self._timings)

    def stats(self) -> dict[str, Any]:
        """Summaries over the history: one dict per stage, per-step and per-image ms, GPU readings."""
        with self._lock:
            timings = list(self._timings)
            samples = list(self._gpu_samples)
        result: dict[str, Any] = {"calls": len(timings), "images": sum(t.num_images for t in timings)}
        for stage in STAGES:
            result[stage] = summarize(getattr(t, stage) for t in timings)
        result["step_ms"] = summarize(ms for t in timings for ms in t.step_ms)
        result["per_image_ms"] = summarize(t.total_ms / t.num_images for t in timings)
        for stage in QUEUE_STAGES:
            values = [getattr(t, stage) for t in timings if getattr(t, stage) is not None]
            if values:
                result[stage] = summarize(values)
        if samples:
            result["gpu"] = {"name": self._sampler.gpu_name, "last": samples[-1]}
            for key in samples[-1]:
                result["gpu"][key] = summarize(s[key] for s in samples if key in s)
        return result
