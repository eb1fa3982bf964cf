"""Prometheus metrics of one service (prometheus-client), in a registry of its own.

Request and stage latency histograms, queue depth, and the GPU's clocks, temperature, power,
utilisation and memory read through NVML at each scrape (runtime/telemetry.py's `GpuSampler`; no
GPU, no GPU series); the other processes on the GPU and the seconds each clock throttle reason held,
from the service's GPU monitor (runtime/gpu_monitor.py, sampled on its own thread). A registry per service, not the process-global one, so that several apps in one
process (tests, a Ray replica beside a driver) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: a tiny model on a CPU is ~0.1 s an image, the full model 0.6-40 s (1024², H100 .. consumer GPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
                   120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STAGES = ("text_encode_ms", "denoise_ms", "vae_decode_ms", "total_ms")
# NVML reading (GpuSampler's name) -> (metric name, help, scale to the metric's unit)
GPU_READINGS = {
    "sm_clock_mhz": ("zimage_gpu_sm_clock_hertz", "GPU SM clock", 1e6),
    "temperature_c": ("zimage_gpu_temperature_celsius", "GPU temperature", 1.0),
    "power_w": ("zimage_gpu_power_watts", "GPU board power draw", 1.0),
    "gpu_util_pct": ("zimage_gpu_utilization_ratio", "GPU utilisation over NVML's last sample period", 0.01),
    "memory_used_mib": ("zimage_gpu_memory_used_bytes", "GPU memory in use (all processes)", 2**20),
}


class _GpuCollector:
    """NVML readings at scrape time, through the service's sampler (none before it is loaded)."""

    def __init__(self, service):
        self._service = service

    def collect(self):
        sample = self._service.gpu_sample() if self._service is not None else {}
        name = sample.get("name") or "gpu"
        for reading, (metric, text, scale) in GPU_READINGS.items():
            if reading in sample:
                family = GaugeMetricFamily(metric, text, labels=["gpu"])
                family.add_metric([name], float(sample[reading]) * scale)
                yield family


class _GpuSharingCollector:
    """The GPU monitor's latest sample: other processes (their memory, whether they compute) and the
    throttle-reason seconds, as counters (`rate()` gives the share of time each reason holds the clocks)."""

    def __init__(self, service):
        self._service = service

    def collect(self):
        sharing = self._service.gpu_sharing() if self._service is not None else None
        if not sharing:
            return
        gpu = sharing.get("gpu") or "gpu"
        current = sharing["current"]
        neighbours = current.get("neighbours", [])
        others = GaugeMetricFamily("zimage_gpu_other_processes", "Other processes with a context on this GPU "
                                   "(this service and its children excluded)", labels=["gpu"])
        others.add_metric([gpu], len(neighbours))
        computing = GaugeMetricFamily("zimage_gpu_other_processes_computing", "Other processes that computed on "
                                      "this GPU in the last seconds (NVML per-process utilisation)", labels=["gpu"])
        computing.add_metric([gpu], sum(p["computing"] is not False for p in neighbours))
        shared = GaugeMetricFamily("zimage_gpu_shared", "1 while another process computes on this GPU",
                                   labels=["gpu"])
        shared.add_metric([gpu], 1 if current.get("shared") else 0)
        memory = GaugeMetricFamily("zimage_gpu_other_process_memory_bytes", "GPU memory each other process holds",
                                   labels=["gpu", "pid", "name"])
        for process in neighbours:
            if process["used_mib"] is not None:
                memory.add_metric([gpu, str(process["pid"]), process["name"] or ""], process["used_mib"] * 2**20)
        throttle = CounterMetricFamily("zimage_gpu_throttle_seconds", "Seconds the GPU's clocks were held by each "
                                       "NVML throttle reason", labels=["gpu", "reason"])
        for reason, seconds in sorted(sharing["throttle_seconds"].items()):
            throttle.add_metric([gpu, reason], seconds)
        yield from (others, computing, shared, memory, throttle)


class ServiceMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("zimage_http_requests", "Generation and edit requests answered, by HTTP status",
                                     ["status"], registry=registry)
        self.task_requests = Counter("zimage_task_requests", "Requests completed, by the task they ran (text-to-image, "
                                     "image-to-image, inpaint, controlnet, controlnet-inpaint)", ["task"],
                                     registry=registry)
        self.request_latency = Histogram("zimage_request_seconds", "Submit to last image of a completed request "
                                         "(queue wait included)", buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("zimage_queue_wait_seconds", "Submit to start of a request",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.stage_latency = Histogram("zimage_stage_seconds", "Time of each stage of one image",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.step_latency = Histogram("zimage_step_seconds", "Time of one denoising step", buckets=STEP_BUCKETS,
                                      registry=registry)
        self.queue_depth = Gauge("zimage_queue_depth", "Requests waiting (the running one excluded)",
                                 registry=registry)
        self.running = Gauge("zimage_running_requests", "Requests being generated (0 or 1)", registry=registry)
        self.ready = Gauge("zimage_ready", "1 once every served size is loaded and warmed", registry=registry)
        self._gpu = None

    def bind(self, service) -> None:
        """Read the live gauges (queue depth, running, ready, GPU) from `service` at each scrape."""
        self.queue_depth.set_function(lambda: service.queue_depth)
        self.running.set_function(lambda: 1 if service._running is not None else 0)
        self.ready.set_function(lambda: 1 if service.ready else 0)
        if self._gpu is None:
            self._gpu = _GpuCollector(service)
            self.registry.register(self._gpu)
            self.registry.register(_GpuSharingCollector(service))

    def observe_image(self, timings) -> None:
        for stage in STAGES:
            self.stage_latency.labels(stage=stage.removesuffix("_ms")).observe(getattr(timings, stage) / 1000.0)
        for ms in timings.step_ms:
            self.step_latency.observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
