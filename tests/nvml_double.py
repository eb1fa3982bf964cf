"""`RecordingNvml`: a test double of the `pynvml` module (nvidia-ml-py), for machines without a GPU.

It answers the NVML calls that runtime/gpu_health.py and gpu_monitor.py make, from values a test sets
(one H200-like GPU by default), and records every call. Constants, error classes and anything else
that is not a function come from the real pynvml, so the code under test spells them as it must on a
GPU; a function the double does not answer raises AttributeError instead of passing silently.
The real thing runs on the H200 (`zimage-trt doctor`, bench/shared_gpu.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pynvml

GIB = 2**30


class RecordingNvml:
    def __init__(self, **values):
        self.calls: list[str] = []
        self.initialised = False
        self.count = 1
        self.name = "NVIDIA H200"
        self.uuid = "GPU-00000000-1111-2222-3333-444444444444"
        self.driver = "580.159.04"
        self.cuda_driver = 13000
        self.persistence = pynvml.NVML_FEATURE_ENABLED
        self.max_sm_mhz = 1980
        self.app_sm_mhz = 1980
        self.default_app_sm_mhz = 1980
        self.sm_mhz = 1980
        self.throttle = 0
        self.temperature = 41
        self.slowdown_c = 90
        self.power_mw = 120_000
        self.limit_mw = 700_000
        self.default_limit_mw = 700_000
        self.util = 0
        self.processes = [(os.getpid(), 20 * GIB)]  # (pid, used bytes): this test process holds a context
        self.process_names: dict[int, str] = {}
        self.process_util: list[tuple[int, int, int]] | None = []  # (pid, sm %, mem %); None: not supported
        self.free = 120 * GIB
        self.total = 141 * GIB
        self.ecc = (1, 1)
        self.ecc_volatile = 0
        self.ecc_aggregate = 0
        self.mig = (0, 0)
        self.pcie = (5, 16, 5, 16)  # current gen, current width, max gen, max width
        self.unsupported: set[str] = set()  # function names that raise NVMLError_NotSupported
        self._stamp = 0
        for key, value in values.items():
            if not hasattr(self, key):
                raise TypeError(f"the NVML double has no value {key!r}")
            setattr(self, key, value)

    def __getattr__(self, name):
        value = getattr(pynvml, name)
        if callable(value) and not isinstance(value, type) and name.startswith("nvml"):
            raise AttributeError(f"the NVML double does not answer {name}")
        return value

    def _call(self, name: str):
        self.calls.append(name)
        if name in self.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # -- the answered calls ----------------------------------------------------------------------
    def nvmlInit(self):
        self._call("nvmlInit")
        self.initialised = True

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        self._call("nvmlDeviceGetName")
        return self.name

    def nvmlDeviceGetUUID(self, handle):
        self._call("nvmlDeviceGetUUID")
        return self.uuid

    def nvmlSystemGetDriverVersion(self):
        self._call("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self):
        self._call("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda_driver

    def nvmlDeviceGetPersistenceMode(self, handle):
        self._call("nvmlDeviceGetPersistenceMode")
        return self.persistence

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        self._call("nvmlDeviceGetMaxClockInfo")
        return self.max_sm_mhz

    def nvmlDeviceGetApplicationsClock(self, handle, kind):
        self._call("nvmlDeviceGetApplicationsClock")
        return self.app_sm_mhz

    def nvmlDeviceGetDefaultApplicationsClock(self, handle, kind):
        self._call("nvmlDeviceGetDefaultApplicationsClock")
        return self.default_app_sm_mhz

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self._call("nvmlDeviceGetClockInfo")
        return self.sm_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self._call("nvmlDeviceGetCurrentClocksEventReasons")
        return self.throttle

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._call("nvmlDeviceGetTemperature")
        return self.temperature

    def nvmlDeviceGetTemperatureThreshold(self, handle, threshold):
        self._call("nvmlDeviceGetTemperatureThreshold")
        return self.slowdown_c

    def nvmlDeviceGetPowerUsage(self, handle):
        self._call("nvmlDeviceGetPowerUsage")
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        self._call("nvmlDeviceGetEnforcedPowerLimit")
        return self.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        self._call("nvmlDeviceGetPowerManagementDefaultLimit")
        return self.default_limit_mw

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=self.util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        self._call("nvmlDeviceGetGraphicsRunningProcesses")
        return []

    def nvmlSystemGetProcessName(self, pid):
        self._call("nvmlSystemGetProcessName")
        if pid not in self.process_names:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.process_names[pid].encode()

    def nvmlDeviceGetProcessUtilization(self, handle, timestamp):
        self._call("nvmlDeviceGetProcessUtilization")
        if self.process_util is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not self.process_util:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        self._stamp += 1  # every read brings one new sample per busy pid, as NVML's buffer does
        return [SimpleNamespace(pid=pid, timeStamp=timestamp + self._stamp, smUtil=sm, memUtil=mem, encUtil=0, decUtil=0)
                for pid, sm, mem in self.process_util]

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(free=self.free, total=self.total, used=self.total - self.free)

    def nvmlDeviceGetEccMode(self, handle):
        self._call("nvmlDeviceGetEccMode")
        return list(self.ecc)

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        self._call("nvmlDeviceGetTotalEccErrors")
        return self.ecc_volatile if counter_type == pynvml.NVML_VOLATILE_ECC else self.ecc_aggregate

    def nvmlDeviceGetMigMode(self, handle):
        self._call("nvmlDeviceGetMigMode")
        return list(self.mig)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        self._call("nvmlDeviceGetCurrPcieLinkGeneration")
        return self.pcie[0]

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        self._call("nvmlDeviceGetCurrPcieLinkWidth")
        return self.pcie[1]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):
        self._call("nvmlDeviceGetMaxPcieLinkGeneration")
        return self.pcie[2]

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):
        self._call("nvmlDeviceGetMaxPcieLinkWidth")
        return self.pcie[3]


def reasons(*names: str) -> int:
    """The NVML bit mask of throttle reasons, from pynvml's own constants."""
    mask = 0
    for name in names:
        mask |= getattr(pynvml, "nvmlClocksEventReason" + name)
    return mask
