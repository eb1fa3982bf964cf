"""Is this GPU fit for a steady service? `zimage-trt doctor`'s checklist, and what the service's GPU
monitor (gpu_monitor.py) reads each sample: clock throttle reasons and the other processes on the GPU.

Everything is read through NVML (`pynvml`, the nvidia-ml-py package), which a caller passes in (the
real module, or a recording double in the tests); `open_gpu` imports it. Each check says what it
found and what to do; a reading the board does not report is "unknown", never an error.

Own processes: this process and its descendants are never another process on the GPU. NVML names
processes by pid; in a container with a PID namespace of its own it may name them by the host's pids,
which this process cannot map: then the service learns its own pid from what NVML lists once its CUDA
context exists (GpuMonitor.learn_own), and says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

# (pynvml constant suffix, our name, the cause shown for a slowed image or None: not a slowdown cause).
# GPU idle and the applications-clocks setting are states, not a slowdown of running work.
THROTTLE_REASONS = (
    ("GpuIdle", "gpu_idle", None),
    ("ApplicationsClocksSetting", "applications_clocks_setting", None),
    ("SwPowerCap", "sw_power_cap", "power cap"),
    ("HwSlowdown", "hw_slowdown", "hardware slowdown"),
    ("SyncBoost", "sync_boost", None),
    ("SwThermalSlowdown", "sw_thermal_slowdown", "thermal"),
    ("HwThermalSlowdown", "hw_thermal_slowdown", "thermal"),
    ("HwPowerBrakeSlowdown", "hw_power_brake_slowdown", "power brake"),
    ("DisplayClockSetting", "display_clock_setting", None),
    ("BoardLimit", "board_limit", "board limit"),
    ("Reliability", "reliability", "reliability limit"),
)
CAUSE_OF_REASON = {name: cause for _, name, cause in THROTTLE_REASONS}
REASON_ADVICE = {
    "sw_power_cap": "the board is at its power limit (normal under full load on a datacenter card; a "
                    "lowered limit or a neighbour's work makes it come sooner)",
    "hw_slowdown": "hardware slowdown (overheating, power brake or a failing power supply): check cooling "
                   "and `nvidia-smi -q -d PERFORMANCE`",
    "sw_thermal_slowdown": "too hot: the driver lowers clocks; improve cooling or airflow",
    "hw_thermal_slowdown": "too hot: the hardware lowers clocks; improve cooling now",
    "hw_power_brake_slowdown": "an external power brake signal (the system's power supply) holds the clocks",
    "board_limit": "a board limit holds the clocks",
    "reliability": "a reliability limit holds the clocks",
}
TEMPERATURE_WARN_C = 75
# The fp16/bf16 pipeline reserves ~22.5 GiB at 1024x1024 (FP8: ~14 GiB; BENCHMARKS.md): less free than
# this and the service will not load, or runs out of memory at its larger sizes.
FREE_MEMORY_WARN_GIB = 24.0
POWER_LIMIT_LOWERED = 0.98  # an enforced limit under 98% of the default is a lowered one


class NoGpu(Exception):
    """No NVML or no NVIDIA GPU here; the message says which."""


@dataclass
class GpuProcess:
    """One process with a context on the GPU, as NVML lists it."""

    pid: int
    used_bytes: int | None  # None: NVML does not report it (e.g. some drivers, Windows WDDM)
    name: str | None = None
    own: bool = False
    computing: bool | None = None  # None: per-process utilisation is not reported here

    def as_dict(self) -> dict[str, Any]:
        used = self.used_bytes
        return {"pid": self.pid, "name": self.name, "used_mib": None if used is None else round(used / 2**20, 1),
                "computing": self.computing}


@dataclass
class GpuCheck:
    name: str
    status: str  # "ok" | "warn" | "info" | "unknown"
    found: str
    advice: str = ""
    value: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def gib(nbytes: float | None) -> str:
    if nbytes is None:
        return "memory not reported"
    value = nbytes / 2**30
    return f"{value:.0f} GiB" if value >= 10 else f"{value:.1f} GiB"


def throttle_bits(nvml) -> list[tuple[int, str]]:
    """(bit, our name) of every reason this pynvml knows."""
    bits = []
    for suffix, name, _ in THROTTLE_REASONS:
        bit = getattr(nvml, "nvmlClocksEventReason" + suffix, None)
        if bit is None:
            bit = getattr(nvml, "nvmlClocksThrottleReason" + suffix, None)
        if bit:
            bits.append((int(bit), name))
    return bits


def decode_throttle(nvml, mask: int) -> list[str]:
    """The names of the reasons set in `mask` (unknown bits as `other_0x...`)."""
    names, known = [], 0
    for bit, name in throttle_bits(nvml):
        known |= bit
        if mask & bit:
            names.append(name)
    if mask & ~known:
        names.append(f"other_{mask & ~known:#x}")
    return names


def read_throttle_mask(nvml, handle) -> int:
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if read is None:  # pynvml before 12.535 names them throttle reasons
        read = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(read(handle))


def slowdown_causes(reasons) -> list[str]:
    """'power cap', 'thermal', ... for the reasons that slow running work (each cause once)."""
    causes = []
    for name in reasons:
        cause = CAUSE_OF_REASON.get(name)
        if cause and cause not in causes:
            causes.append(cause)
    return causes


def sharing_cause(neighbours) -> str | None:
    """'shared GPU: pid 1234, 40 GiB' for the other processes that compute (or may: utilisation unknown)."""
    active = [p for p in neighbours if p.computing is not False]
    if not active:
        return None
    return "shared GPU: " + "; ".join(f"pid {p.pid}, {gib(p.used_bytes)}" for p in active)


# -- own processes -------------------------------------------------------------------------------------
class OwnProcesses:
    """This process, its descendants (found through /proc), and pids learned from NVML."""

    def __init__(self, root_pid: int | None = None, proc: str = "/proc"):
        self.root = root_pid if root_pid is not None else os.getpid()
        self.learned: set[int] = set()
        self._proc = proc
        self._known: dict[int, bool] = {}

    def __contains__(self, pid: int) -> bool:
        if pid == self.root or pid in self.learned:
            return True
        if pid not in self._known:
            self._known[pid] = self._descends(pid)
        return self._known[pid]

    def forget_others(self, listed: set[int]) -> None:
        """Drop cached answers for pids no longer listed (a pid may be reused by another process)."""
        for pid in [p for p in self._known if p not in listed]:
            del self._known[pid]

    def _descends(self, pid: int) -> bool:
        for _ in range(64):  # a chain of ancestors, up to init
            try:
                with open(f"{self._proc}/{pid}/stat", encoding="ascii", errors="replace") as stat:
                    pid = int(stat.read().rsplit(")", 1)[1].split()[1])  # the field after the name: ppid
            except (OSError, ValueError, IndexError):  # gone, or in another pid namespace
                return False
            if pid == self.root:
                return True
            if pid <= 1:
                return False
        return False


def list_processes(nvml, handle, own: OwnProcesses, names: dict[int, str | None] | None = None) -> list[GpuProcess]:
    """Compute and graphics processes on the GPU (one entry per pid), own ones marked."""
    found: dict[int, GpuProcess] = {}
    for reader in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        read = getattr(nvml, reader, None)
        if read is None:
            continue
        try:
            listed = read(handle)
        except nvml.NVMLError:  # e.g. graphics processes on a compute-only board
            continue
        for info in listed:
            pid, used = int(info.pid), info.usedGpuMemory
            used = int(used) if used is not None else None
            if pid in found:
                prior = found[pid].used_bytes
                found[pid].used_bytes = max(prior or 0, used or 0) if (prior, used) != (None, None) else None
            else:
                found[pid] = GpuProcess(pid, used, own=pid in own)
    names = names if names is not None else {}
    for pid, process in found.items():
        if pid not in names:
            names[pid] = _process_name(nvml, pid)
        process.name = names[pid]
    return list(found.values())


def _process_name(nvml, pid: int) -> str | None:
    try:
        path = as_text(nvml.nvmlSystemGetProcessName(pid))
        return os.path.basename(path) or path
    except Exception:  # noqa: BLE001 - in another pid namespace NVML (and /proc) may not know it
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
                return comm.read().strip() or None
        except OSError:
            return None


class ProcessActivity:
    """Which pids computed lately, from NVML's per-process utilisation samples (SM or memory > 0)."""

    def __init__(self):
        self.supported: bool | None = None  # None until the first read
        self._last_timestamp = 0
        self.active_at: dict[int, float] = {}

    def update(self, nvml, handle, now: float) -> None:
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, self._last_timestamp)
        except nvml.NVMLError as error:
            if getattr(error, "value", None) in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_NO_PERMISSION):
                self.supported = False
            elif self.supported is None:
                self.supported = True  # not found: no samples since the last read
            return
        self.supported = True
        newest = self._last_timestamp
        for sample in samples:
            stamp = int(sample.timeStamp)
            if stamp <= self._last_timestamp:
                continue
            newest = max(newest, stamp)
            if sample.smUtil > 0 or sample.memUtil > 0:
                self.active_at[int(sample.pid)] = now
        self._last_timestamp = newest

    def computing(self, pid: int, now: float, window_s: float) -> bool | None:
        if not self.supported:
            return None
        return now - self.active_at.get(pid, -1e18) <= window_s


# -- the doctor's checklist ----------------------------------------------------------------------------
def open_gpu(index: int = 0, nvml=None):
    """(nvml, handle) of GPU `index` as nvidia-smi numbers them; raises NoGpu without NVML or a GPU, and
    ValueError for an index past the last GPU."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise NoGpu("NVML is not installed (pip install nvidia-ml-py), so no GPU can be read") from None
    try:
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as error:
        raise NoGpu(f"no NVIDIA GPU readable here: NVML says '{as_text(error)}' (no driver, or no GPU)") from None
    if count == 0:
        raise NoGpu("NVML runs but sees no GPU")
    if not 0 <= index < count:
        raise ValueError(f"--device {index}: there is no GPU {index}; this machine has {count} "
                         f"(0..{count - 1}, as nvidia-smi numbers them)")
    return nvml, nvml.nvmlDeviceGetHandleByIndex(index)


def doctor_report(index: int = 0, nvml=None, own: OwnProcesses | None = None) -> dict[str, Any]:
    """The checklist of GPU `index`: {"available", "gpu", "checks": [...], "warnings"}; without a GPU,
    {"available": False, "reason": ...} (not an error: a CPU machine has nothing to check)."""
    try:
        nvml, handle = open_gpu(index, nvml)
    except NoGpu as error:
        return {"available": False, "reason": str(error), "gpu": None, "checks": [], "warnings": 0}
    own = own if own is not None else OwnProcesses()
    gpu = {"index": index}
    for key, read in (("name", nvml.nvmlDeviceGetName), ("uuid", nvml.nvmlDeviceGetUUID)):
        try:
            gpu[key] = as_text(read(handle))
        except nvml.NVMLError:
            gpu[key] = None
    checks = []
    for name, check in CHECKS:
        try:
            checks.append(check(nvml, handle, own))
        except nvml.NVMLError as error:
            checks.append(GpuCheck(name, "unknown", f"not reported on this GPU (NVML: {as_text(error)})"))
    return {"available": True, "gpu": gpu, "checks": [c.as_dict() for c in checks],
            "warnings": sum(c.status == "warn" for c in checks)}


def _optional(read: Callable, nvml, default=None):
    try:
        return read()
    except nvml.NVMLError:
        return default


def check_persistence(nvml, handle, own) -> GpuCheck:
    on = nvml.nvmlDeviceGetPersistenceMode(handle) == nvml.NVML_FEATURE_ENABLED
    if on:
        return GpuCheck("persistence_mode", "ok", "enabled", value={"enabled": True})
    return GpuCheck("persistence_mode", "warn", "disabled",
                    "enable it (`sudo nvidia-smi -pm 1`, or run nvidia-persistenced): without it the driver "
                    "unloads when the last process exits, and the next start pays its initialisation and "
                    "may find other clock settings", {"enabled": False})


def check_clocks(nvml, handle, own) -> GpuCheck:
    sm = nvml.NVML_CLOCK_SM
    top = int(nvml.nvmlDeviceGetMaxClockInfo(handle, sm))
    target = _optional(lambda: int(nvml.nvmlDeviceGetApplicationsClock(handle, sm)), nvml)
    default = _optional(lambda: int(nvml.nvmlDeviceGetDefaultApplicationsClock(handle, sm)), nvml)
    value = {"max_sm_mhz": top, "applications_sm_mhz": target, "default_applications_sm_mhz": default}
    if target is None:
        return GpuCheck("clocks", "info", f"max SM clock {top} MHz; applications clocks not reported", "", value)
    found = f"applications SM clock {target} MHz of max {top} MHz (default {default} MHz)"
    steadiest = ("for the steadiest latency lock the SM clock to one the card holds at full load "
                 "(`sudo nvidia-smi -lgc F,F`; `-rgc` undoes it): boosting to the top and then falling to "
                 "the power limit is what makes image times wander")
    if default is not None and target < default:
        return GpuCheck("clocks", "info", found + ": lowered",
                        "steady but slower than the default; `sudo nvidia-smi -rac` restores it, or keep it "
                        "if it was set for steadiness", value)
    return GpuCheck("clocks", "info", found, steadiest, value)


def check_sm_clock(nvml, handle, own) -> GpuCheck:
    sm = nvml.NVML_CLOCK_SM
    now = int(nvml.nvmlDeviceGetClockInfo(handle, sm))
    top = _optional(lambda: int(nvml.nvmlDeviceGetMaxClockInfo(handle, sm)), nvml)
    reasons = decode_throttle(nvml, read_throttle_mask(nvml, handle))
    value = {"sm_clock_mhz": now, "max_sm_mhz": top, "throttle_reasons": reasons}
    found = f"{now} MHz" + (f" of {top} MHz" if top else "") + f"; reasons: {', '.join(reasons) or 'none'}"
    slowing = [r for r in reasons if CAUSE_OF_REASON.get(r)]
    if slowing:
        return GpuCheck("sm_clock", "warn", found, "; ".join(REASON_ADVICE.get(r, r) for r in slowing), value)
    return GpuCheck("sm_clock", "ok", found, "" if "gpu_idle" not in reasons else
                    "idle now: run the doctor again under load to see what holds the clocks", value)


def check_temperature(nvml, handle, own) -> GpuCheck:
    celsius = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    slowdown = _optional(lambda: int(nvml.nvmlDeviceGetTemperatureThreshold(
        handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)), nvml)
    value = {"temperature_c": celsius, "slowdown_c": slowdown, "warn_c": TEMPERATURE_WARN_C}
    found = f"{celsius} C" + (f" (the GPU slows down at {slowdown} C)" if slowdown else "")
    if celsius >= TEMPERATURE_WARN_C:
        return GpuCheck("temperature", "warn", found, f"at or over {TEMPERATURE_WARN_C} C: clocks drop as it nears "
                        "the slowdown point; check the fans, airflow and the room", value)
    return GpuCheck("temperature", "ok", found, "", value)


def check_power(nvml, handle, own) -> GpuCheck:
    draw = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    default = _optional(lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0, nvml)
    value = {"power_w": draw, "limit_w": limit, "default_limit_w": default}
    found = f"{draw:.0f} W of a {limit:.0f} W limit" + (f" (default {default:.0f} W)" if default else "")
    if default and limit < POWER_LIMIT_LOWERED * default:
        return GpuCheck("power", "warn", found + ": the limit is lowered",
                        f"clocks fall sooner under load; `sudo nvidia-smi -pl {default:.0f}` restores the default",
                        value)
    return GpuCheck("power", "ok", found, "", value)


def check_driver(nvml, handle, own) -> GpuCheck:
    driver = as_text(nvml.nvmlSystemGetDriverVersion())
    cuda = _optional(lambda: int(nvml.nvmlSystemGetCudaDriverVersion_v2()), nvml)
    cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None
    runtime = torch.version.cuda
    value = {"driver": driver, "driver_cuda": cuda_text, "torch_cuda": runtime}
    found = f"driver {driver}" + (f", CUDA {cuda_text}" if cuda_text else "") + \
        (f"; torch built for CUDA {runtime}" if runtime else "")
    if cuda and runtime and int(runtime.split(".")[0]) > cuda // 1000:
        return GpuCheck("driver", "warn", found, f"this driver is older than torch's CUDA {runtime} needs: install a "
                        f"driver for CUDA {runtime.split('.')[0]}, or a torch built for CUDA {cuda_text}", value)
    return GpuCheck("driver", "info", found, "", value)


def check_processes(nvml, handle, own) -> GpuCheck:
    processes = list_processes(nvml, handle, own)
    others = [p for p in processes if not p.own]
    activity = ProcessActivity()  # one read: the samples NVML keeps (its last few seconds)
    activity.update(nvml, handle, now=0.0)
    for process in others:
        process.computing = activity.computing(process.pid, 0.0, window_s=1.0)
    value = {"others": [p.as_dict() for p in others], "own": [p.pid for p in processes if p.own]}
    if not others:
        return GpuCheck("other_processes", "ok", "none", "", value)
    doing = {True: ", computing", False: ", idle", None: ""}
    found = "; ".join(f"pid {p.pid} ({p.name or '?'}) holds {gib(p.used_bytes)}{doing[p.computing]}" for p in others)
    return GpuCheck("other_processes", "warn", found,
                    "another process on this GPU takes SM time and memory bandwidth: images then take up to "
                    "twice as long and vary from one to the next; give the service a GPU of its own "
                    "(CUDA_VISIBLE_DEVICES) or a MIG instance", value)


def check_memory(nvml, handle, own) -> GpuCheck:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    free, total = int(info.free), int(info.total)
    value = {"free_bytes": free, "total_bytes": total, "warn_below_gib": FREE_MEMORY_WARN_GIB}
    found = f"{gib(free)} free of {gib(total)}"
    if free < FREE_MEMORY_WARN_GIB * 2**30:
        return GpuCheck("free_memory", "warn", found,
                        f"under {FREE_MEMORY_WARN_GIB:.0f} GiB: the fp16/bf16 pipeline at 1024x1024 may not fit; "
                        "free the GPU, or serve the FP8 engine (~14 GiB)", value)
    return GpuCheck("free_memory", "ok", found, "", value)


def check_ecc(nvml, handle, own) -> GpuCheck:
    current, pending = nvml.nvmlDeviceGetEccMode(handle)
    if not current:
        return GpuCheck("ecc", "info", "ECC off" + (" (on after the next reset)" if pending else ""),
                        "", {"enabled": False, "pending": bool(pending)})
    uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    volatile = int(nvml.nvmlDeviceGetTotalEccErrors(handle, uncorrected, nvml.NVML_VOLATILE_ECC))
    lifetime = _optional(lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, uncorrected,
                                                                        nvml.NVML_AGGREGATE_ECC)), nvml)
    value = {"enabled": True, "uncorrected_since_boot": volatile, "uncorrected_lifetime": lifetime}
    found = f"ECC on; uncorrected errors: {volatile} since the driver loaded" + \
        (f", {lifetime} over the card's life" if lifetime is not None else "")
    if volatile:
        return GpuCheck("ecc", "warn", found, "uncorrected memory errors corrupt results or kill processes: "
                        "drain the GPU, reset it (`sudo nvidia-smi -r`), and replace it if they come back", value)
    return GpuCheck("ecc", "ok", found, "", value)


def check_mig(nvml, handle, own) -> GpuCheck:
    current, pending = nvml.nvmlDeviceGetMigMode(handle)
    on = current == nvml.NVML_DEVICE_MIG_ENABLE
    value = {"enabled": on, "pending_enabled": pending == nvml.NVML_DEVICE_MIG_ENABLE}
    if current != pending:
        return GpuCheck("mig", "warn", f"MIG {'on' if on else 'off'}, {'on' if pending else 'off'} after a reset",
                        "a MIG mode change waits for a GPU reset (`sudo nvidia-smi -r`)", value)
    if on:
        return GpuCheck("mig", "info", "MIG on: the GPU is split into instances",
                        "run the service on one instance (CUDA_VISIBLE_DEVICES=MIG-...); instances share "
                        "nothing but the power budget, so neighbours there do not slow it", value)
    return GpuCheck("mig", "info", "MIG off: the whole GPU is one device", "", value)


def check_pcie(nvml, handle, own) -> GpuCheck:
    gen, width = int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)), int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))
    top_gen = int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))
    top_width = int(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle))
    value = {"generation": gen, "width": width, "max_generation": top_gen, "max_width": top_width}
    found = f"PCIe gen {gen} x{width} (max gen {top_gen} x{top_width})"
    if width < top_width:
        return GpuCheck("pcie", "warn", found, "the link trained narrower than it can be: reseat the card or check "
                        "the slot; uploads of weights and downloads of images take longer", value)
    if gen < top_gen:
        return GpuCheck("pcie", "info", found, "links train down to save power when idle: check again under load",
                        value)
    return GpuCheck("pcie", "ok", found, "", value)


CHECKS = (("persistence_mode", check_persistence), ("clocks", check_clocks), ("sm_clock", check_sm_clock),
          ("temperature", check_temperature), ("power", check_power), ("driver", check_driver),
          ("other_processes", check_processes), ("free_memory", check_memory), ("ecc", check_ecc),
          ("mig", check_mig), ("pcie", check_pcie))


def render_text(report: dict[str, Any]) -> str:
    """The report as the doctor prints it: one line per check, its advice indented below."""
    if not report["available"]:
        return f"no GPU to check: {report['reason']}"
    gpu = report["gpu"]
    lines = [f"GPU {gpu['index']}: {gpu.get('name') or '?'} ({gpu.get('uuid') or 'no uuid'})"]
    marks = {"ok": "ok  ", "warn": "WARN", "info": "info", "unknown": "??  "}
    for check in report["checks"]:
        lines.append(f"  [{marks.get(check['status'], check['status'])}] {check['name']:<17} {check['found']}")
        if check["advice"]:
            lines.append(f"         {'':<17} -> {check['advice']}")
    lines.append(f"{report['warnings']} warning(s)")
    return "\n".join(lines)
