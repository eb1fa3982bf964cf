"""`GpuMonitor`: what the GPU went through while each image ran, sampled off the request path.

A daemon thread reads NVML at ~4 Hz (every `interval_s`): the clock throttle reasons, the SM clock,
the device utilisation and the other processes on the GPU (with their memory and, where NVML
reports per-process utilisation, whether they computed in the last `active_window_s`). The service
asks, without touching NVML itself:

    mark = monitor.mark()                 # before an image
    seen = monitor.seen_since(mark)       # after it: throttle fractions, neighbours, causes
    monitor.current()                     # the latest sample, for /v1/stats and /metrics
    monitor.sharing_reason()              # why /readyz should say 503, or None

Causes are what a user reads: "shared GPU: pid 1234, 40 GiB", "power cap", "thermal".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .gpu_health import (GpuProcess, OwnProcesses, ProcessActivity, as_text, decode_throttle, gib,
                         list_processes, read_throttle_mask, sharing_cause, slowdown_causes)
from .telemetry import nvml_handle

log = logging.getLogger("zimage_trt.gpu")

INTERVAL_S = 0.25
ACTIVE_WINDOW_S = 5.0  # a neighbour computes if NVML saw it busy this recently (NVML may sample per-process utilisation a second or more apart)
CAUSE_FRACTION = 0.25  # a throttle reason names an image's cause when active in this share of its samples
IDLE_GRACE_S = 1.5  # NVML's utilisation averages over up to 1 s: our own last image still shows before this
IDLE_BUSY_PCT = 20.0  # utilisation while this service idles that means someone else computes
HISTORY = 2400  # samples kept: 10 minutes at 4 Hz (an image's window must fit)


@dataclass
class GpuSample:
    t: float  # time.monotonic()
    reasons: tuple[str, ...]
    sm_clock_mhz: float | None
    util_pct: float | None
    neighbours: tuple[GpuProcess, ...]  # other processes (own ones left out)
    listed: int  # processes NVML listed, own included
    idle_s: float | None  # how long this service had been idle (None: busy, or not told)


class GpuMonitor:
    """NVML samples of one GPU on a background thread; `interval_s=0` samples only when `poll()` is called."""

    def __init__(self, nvml, handle, name: str | None = None, interval_s: float = INTERVAL_S,
                 own: OwnProcesses | None = None, history: int = HISTORY, active_window_s: float = ACTIVE_WINDOW_S):
        self._nvml, self._handle = nvml, handle
        self.name = name
        self.interval_s = interval_s
        self.own = own if own is not None else OwnProcesses()
        self.active_window_s = active_window_s
        self.own_basis = "this process and its children"
        self._samples: deque[GpuSample] = deque(maxlen=history)
        self._activity = ProcessActivity()
        self._names: dict[int, str | None] = {}
        self._throttle_s: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: Callable[[], bool] | None = None
        self._idle_since: float | None = None
        self._failed_polls = 0

    @classmethod
    def for_device(cls, device, **options) -> "GpuMonitor | None":
        """A monitor of a CUDA device (matched to NVML by UUID), or None: no CUDA device, no NVML."""
        device = torch.device(device) if device is not None else None
        if device is None or device.type != "cuda":
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = nvml_handle(pynvml, device)
            return cls(pynvml, handle, name=as_text(pynvml.nvmlDeviceGetName(handle)), **options)
        except Exception:  # noqa: BLE001 - no pynvml, no driver: the service runs without the monitor
            return None

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, busy: Callable[[], bool] | None = None, own_bytes_hint: int | None = None) -> None:
        """Learn which listed process is ours (our CUDA context exists by now), then sample in the background.
        `busy()` says whether the service is generating (utilisation while it idles is someone else's)."""
        self._busy = busy
        self.learn_own(own_bytes_hint)
        self.poll()
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zimage-trt-gpu-monitor", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def learn_own(self, own_bytes_hint: int | None = None) -> None:
        """If NVML does not list this process by our pid (a container's PID namespace), take as ours the
        listed process whose memory is nearest above `own_bytes_hint` (what our allocator holds)."""
        try:
            listed = list_processes(self._nvml, self._handle, self.own, self._names)
        except Exception:  # noqa: BLE001
            return
        if not listed or any(p.own for p in listed):
            return
        hint = own_bytes_hint or 0
        above = [p for p in listed if (p.used_bytes or 0) >= hint]
        mine = min(above or listed, key=lambda p: abs((p.used_bytes or 0) - hint))
        self.own.learned.add(mine.pid)
        self.own_basis = (f"learned: NVML lists pids of another namespace; pid {mine.pid} "
                          f"({gib(mine.used_bytes)}) taken as this service's")
        log.info("GPU monitor: %s", self.own_basis)

    # -- sampling ----------------------------------------------------------------------------------
    def poll(self) -> GpuSample | None:
        """Read one sample (never raises: a failing read leaves that field out)."""
        nvml, handle = self._nvml, self._handle
        now = time.monotonic()
        try:
            reasons = tuple(decode_throttle(nvml, read_throttle_mask(nvml, handle)))
        except Exception:  # noqa: BLE001 - the monitor must never break the service
            reasons = ()
        clock = self._read(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        util = self._read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        try:
            self._activity.update(nvml, handle, now)
            processes = list_processes(nvml, handle, self.own, self._names)
            self._failed_polls = 0
        except Exception as error:  # noqa: BLE001
            self._failed_polls += 1
            if self._failed_polls == 1:
                log.warning("GPU monitor: listing the GPU's processes failed: %s", error)
            processes = []
        listed = {p.pid for p in processes}
        self.own.forget_others(listed)
        for pid in [p for p in self._names if p not in listed]:
            del self._names[pid]
        neighbours = []
        for process in processes:
            if not process.own:
                process.computing = self._activity.computing(process.pid, now, self.active_window_s)
                neighbours.append(process)
        idle_s = self._idle_seconds(now)
        sample = GpuSample(now, reasons, clock, util, tuple(neighbours), len(processes), idle_s)
        with self._lock:
            previous = self._samples[-1] if self._samples else None
            if previous is not None:
                dt = min(now - previous.t, 4 * max(self.interval_s, INTERVAL_S))
                for reason in previous.reasons:  # the previous reading held until this one
                    self._throttle_s[reason] = self._throttle_s.get(reason, 0.0) + dt
            for reason in reasons:
                self._throttle_s.setdefault(reason, 0.0)
            self._samples.append(sample)
        return sample

    def _read(self, read) -> float | None:
        try:
            return float(read())
        except Exception:  # noqa: BLE001
            return None

    def _idle_seconds(self, now: float) -> float | None:
        busy = self._busy
        if busy is None:
            return None
        try:
            is_busy = bool(busy())
        except Exception:  # noqa: BLE001
            return None
        if is_busy:
            self._idle_since = None
            return None
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since

    # -- what the service reads --------------------------------------------------------------------
    def mark(self) -> float:
        return time.monotonic()

    def seen_since(self, mark: float, until: float | None = None) -> dict[str, Any]:
        """What the GPU went through from `mark` to `until` (now): the share of samples each throttle reason
        was active in, the other processes seen (their largest memory), and the causes of a slowdown.
        With no sample inside a short window, the latest sample stands for it."""
        until = until if until is not None else time.monotonic()
        with self._lock:
            window = [s for s in self._samples if mark <= s.t <= until]
            if not window and self._samples:
                window = [self._samples[-1]]
        if not window:
            return {"samples": 0, "throttle": {}, "neighbours": [], "causes": []}
        counts: dict[str, int] = {}
        seen: dict[int, GpuProcess] = {}
        for sample in window:
            for reason in sample.reasons:
                counts[reason] = counts.get(reason, 0) + 1
            for process in sample.neighbours:
                prior = seen.get(process.pid)
                if prior is None:
                    seen[process.pid] = GpuProcess(process.pid, process.used_bytes, process.name, False,
                                                   process.computing)
                    continue
                prior.used_bytes = max(prior.used_bytes or 0, process.used_bytes or 0) or prior.used_bytes
                if process.computing is not None:
                    prior.computing = bool(prior.computing) or process.computing
        throttle = {reason: round(n / len(window), 3) for reason, n in counts.items()}
        neighbours = list(seen.values())
        causes = [c for c in [sharing_cause(neighbours)] if c]
        causes += slowdown_causes(r for r, share in throttle.items() if share >= CAUSE_FRACTION)
        return {"samples": len(window), "throttle": throttle, "neighbours": [p.as_dict() for p in neighbours],
                "causes": causes}

    def latest(self) -> GpuSample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def current(self) -> dict[str, Any]:
        sample = self.latest()
        if sample is None:
            return {"samples": 0}
        reason = self._sharing_reason(sample)
        causes = [c for c in [sharing_cause(sample.neighbours)] if c] + slowdown_causes(sample.reasons)
        if reason and not sample.neighbours:
            causes.insert(0, "shared GPU: another process (not listed)")
        return {"age_s": round(time.monotonic() - sample.t, 3), "throttle": list(sample.reasons),
                "sm_clock_mhz": sample.sm_clock_mhz, "util_pct": sample.util_pct,
                "neighbours": [p.as_dict() for p in sample.neighbours], "shared": reason is not None,
                "reason": reason, "causes": causes, "processes_listed": sample.listed,
                "process_utilisation": self._activity.supported, "own": self.own_basis,
                "own_pids": sorted({self.own.root, *self.own.learned}), "interval_s": self.interval_s}

    def sharing_reason(self) -> str | None:
        """Why this GPU counts as shared now (another process computes on it), or None."""
        sample = self.latest()
        return self._sharing_reason(sample) if sample is not None else None

    def _sharing_reason(self, sample: GpuSample) -> str | None:
        active = [p for p in sample.neighbours if p.computing is not False]
        if active:
            basis = "" if self._activity.supported else " (NVML reports no per-process utilisation here: " \
                                                         "a process holding a context counts)"
            named = ", ".join(f"pid {p.pid} ({p.name or '?'}, {gib(p.used_bytes)})" for p in active)
            return f"another process computes on this GPU: {named}{basis}"
        if (not sample.neighbours and sample.idle_s is not None and sample.idle_s >= IDLE_GRACE_S
                and sample.util_pct is not None and sample.util_pct >= IDLE_BUSY_PCT):
            return (f"another process computes on this GPU: utilisation {sample.util_pct:.0f}% while this "
                    f"service idles (NVML does not list its pid here)")
        return None

    def summary(self) -> dict[str, Any]:
        return {"gpu": self.name, "current": self.current(), "throttle_seconds": self.throttle_seconds()}

    def throttle_seconds(self) -> dict[str, float]:
        """Seconds each throttle reason has been active since the monitor started."""
        with self._lock:
            return dict(self._throttle_s)


def reserved_bytes(device) -> int | None:
    """What torch's allocator holds on a CUDA device (the hint for learn_own), else None."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.memory_reserved(device))
