"""`zimage-trt doctor` and the GPU monitor: the no-GPU path for real (this machine has no NVML library),
the checklist and the sampler against a recording NVML double (tests/nvml_double.py) whose values trip
each warning. The real readings come from the H200 run (bench/shared_gpu.py saves `doctor --json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pynvml
import pytest

from nvml_double import GIB, RecordingNvml, reasons
from zimage_trt import cli
from zimage_trt.runtime import gpu_health
from zimage_trt.runtime.gpu_health import OwnProcesses, decode_throttle, doctor_report, render_text
from zimage_trt.runtime.gpu_monitor import GpuMonitor

NEIGHBOUR = 1234  # a pid that is not ours (and not our child): /proc/1234 is someone else's or absent


def by_name(report) -> dict:
    return {check["name"]: check for check in report["checks"]}


def nvml_missing_here() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return True
    return False


# -- no GPU -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not nvml_missing_here(), reason="this machine has NVML: the no-GPU path is checked on CPU runners")
def test_doctor_without_a_gpu_says_so_and_exits_0(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no GPU to check: no NVIDIA GPU readable here: NVML says")
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["available"] is False and report["checks"] == [] and "NVML" in report["reason"]


def test_doctor_without_nvml_installed_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"available": False, "reason": "NVML is not installed (pip install nvidia-ml-py), so no GPU "
                      "can be read", "gpu": None, "checks": [], "warnings": 0}


def test_doctor_runs_as_a_command_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "doctor", "--json"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "available" in json.loads(done.stdout)


def test_a_gpu_index_past_the_last_is_refused_with_the_range(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", RecordingNvml(count=2))
    assert cli.main(["doctor", "--device", "5"]) == 2
    assert "there is no GPU 5; this machine has 2 (0..1, as nvidia-smi numbers them)" in capsys.readouterr().err


# -- the checklist --------------------------------------------------------------------------------------
def test_a_steady_gpu_passes_every_check():
    report = doctor_report(0, RecordingNvml())
    checks = by_name(report)
    assert list(checks) == ["persistence_mode", "clocks", "sm_clock", "temperature", "power", "driver",
                            "other_processes", "free_memory", "ecc", "mig", "pcie"]
    assert report["warnings"] == 0, [c for c in report["checks"] if c["status"] == "warn"]
    assert report["gpu"] == {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-00000000-1111-2222-3333-444444444444"}
    assert checks["other_processes"]["found"] == "none"  # this test process's own context is not a neighbour
    assert checks["other_processes"]["value"]["own"] == [os.getpid()]
    assert checks["driver"]["found"].startswith("driver 580.159.04, CUDA 13.0")
    assert checks["pcie"]["found"] == "PCIe gen 5 x16 (max gen 5 x16)"


@pytest.mark.parametrize("values, check, found, advice", [
    ({"persistence": 0}, "persistence_mode", "disabled", "nvidia-smi -pm 1"),
    ({"throttle": reasons("SwPowerCap", "HwThermalSlowdown"), "sm_mhz": 1410}, "sm_clock",
     "1410 MHz of 1980 MHz; reasons: sw_power_cap, hw_thermal_slowdown", "power limit"),
    ({"temperature": 75}, "temperature", "75 C (the GPU slows down at 90 C)", "75 C"),
    ({"limit_mw": 400_000, "power_mw": 399_000}, "power", "399 W of a 400 W limit (default 700 W): the limit is lowered",
     "nvidia-smi -pl 700"),
    ({"cuda_driver": 12040}, "driver", "driver 580.159.04, CUDA 12.4; torch built for CUDA 13.0", "older than torch"),
    ({"processes": [(os.getpid(), 20 * GIB), (NEIGHBOUR, 40 * GIB)], "process_names": {NEIGHBOUR: "/usr/bin/python3"},
      "process_util": [(NEIGHBOUR, 97, 40)]}, "other_processes", "pid 1234 (python3) holds 40 GiB, computing",
     "CUDA_VISIBLE_DEVICES"),
    ({"free": 10 * GIB}, "free_memory", "10 GiB free of 141 GiB", "under 24 GiB"),
    ({"ecc_volatile": 3, "ecc_aggregate": 7}, "ecc",
     "ECC on; uncorrected errors: 3 since the driver loaded, 7 over the card's life", "reset it"),
    ({"mig": (0, 1)}, "mig", "MIG off, on after a reset", "waits for a GPU reset"),
    ({"pcie": (4, 8, 5, 16)}, "pcie", "PCIe gen 4 x8 (max gen 5 x16)", "narrower"),
])
def test_each_warning_trips_on_its_reading(values, check, found, advice, monkeypatch):
    monkeypatch.setattr(gpu_health.torch.version, "cuda", "13.0")  # torch as on the H200 (here: a CPU build)
    report = doctor_report(0, RecordingNvml(**values))
    result = by_name(report)[check]
    assert result["status"] == "warn", result
    assert result["found"] == found
    assert advice in result["advice"]
    assert report["warnings"] == 1  # each reading trips its own check only


def test_idle_and_app_clock_reasons_are_states_not_slowdowns():
    nvml = RecordingNvml(throttle=reasons("GpuIdle", "ApplicationsClocksSetting"), sm_mhz=345)
    check = by_name(doctor_report(0, nvml))["sm_clock"]
    assert check["status"] == "ok" and "under load" in check["advice"]
    assert check["value"]["throttle_reasons"] == ["gpu_idle", "applications_clocks_setting"]


def test_throttle_masks_decode_to_names_and_unknown_bits_are_kept():
    assert decode_throttle(pynvml, 0) == []
    assert decode_throttle(pynvml, reasons("SwPowerCap", "SwThermalSlowdown")) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert decode_throttle(pynvml, 0x4 | 0x10000) == ["sw_power_cap", "other_0x10000"]


def test_a_reading_the_board_does_not_report_is_unknown_not_an_error():
    nvml = RecordingNvml(unsupported={"nvmlDeviceGetEccMode", "nvmlDeviceGetMigMode", "nvmlDeviceGetApplicationsClock"})
    checks = by_name(doctor_report(0, nvml))
    assert checks["ecc"]["status"] == checks["mig"]["status"] == "unknown"
    assert checks["ecc"]["found"] == "not reported on this GPU (NVML: Not Supported)"
    assert checks["clocks"]["status"] == "info" and "applications clocks not reported" in checks["clocks"]["found"]


def test_the_text_report_has_one_line_per_check_and_the_advice(monkeypatch, capsys):
    nvml = RecordingNvml(temperature=83, processes=[(NEIGHBOUR, 40 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert cli.main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert text == render_text(doctor_report(0, nvml)) + "\n"
    assert "[WARN] temperature       83 C" in text and "pid 1234 (?) holds 40 GiB" in text
    assert text.rstrip().endswith("2 warning(s)")
    assert nvml.calls.count("nvmlInit") == 2  # (the report above, and the CLI's) through `import pynvml`


def test_own_processes_are_this_process_and_its_descendants():
    own = OwnProcesses()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getpid() in own and child.pid in own
        assert 1 not in own and os.getppid() not in own
    finally:
        child.kill()
        child.wait()


# -- the monitor --------------------------------------------------------------------------------------
def test_the_monitor_names_a_computing_neighbour_and_the_throttle_of_a_window():
    nvml = RecordingNvml()
    monitor = GpuMonitor(nvml, ("handle", 0), name="NVIDIA H200", interval_s=0)
    monitor.start()
    assert monitor.sharing_reason() is None and monitor.current()["neighbours"] == []
    mark = monitor.mark()
    nvml.processes.append((NEIGHBOUR, 40 * GIB))
    nvml.process_util = [(NEIGHBOUR, 95, 10)]
    nvml.throttle = reasons("SwPowerCap")
    for _ in range(4):
        monitor.poll()
    seen = monitor.seen_since(mark)
    assert seen["causes"] == ["shared GPU: pid 1234, 40 GiB", "power cap"]
    assert seen["throttle"] == {"sw_power_cap": 1.0}
    assert seen["neighbours"] == [{"pid": NEIGHBOUR, "name": None, "used_mib": 40960.0, "computing": True}]
    assert monitor.sharing_reason() == "another process computes on this GPU: pid 1234 (?, 40 GiB)"
    # It leaves: at once not shared, and the counters keep what was seen.
    nvml.processes.pop()
    nvml.process_util, nvml.throttle = [], 0
    monitor.poll()
    assert monitor.sharing_reason() is None and monitor.current()["causes"] == []
    assert monitor.throttle_seconds()["sw_power_cap"] >= 0


def test_a_neighbour_that_holds_memory_but_idles_is_listed_not_blamed():
    nvml = RecordingNvml(processes=[(os.getpid(), 20 * GIB), (NEIGHBOUR, 2 * GIB)], process_util=[(os.getpid(), 90, 50)])
    monitor = GpuMonitor(nvml, ("handle", 0), interval_s=0)
    monitor.start()
    monitor.poll()
    current = monitor.current()
    assert current["neighbours"][0]["computing"] is False and current["shared"] is False
    assert monitor.seen_since(monitor.mark() - 10)["causes"] == []


def test_without_per_process_utilisation_a_listed_neighbour_counts():
    nvml = RecordingNvml(processes=[(os.getpid(), 20 * GIB), (NEIGHBOUR, 3 * GIB)], process_util=None)
    monitor = GpuMonitor(nvml, ("handle", 0), interval_s=0)
    monitor.start()
    assert "a process holding a context counts" in monitor.sharing_reason()


def test_in_another_pid_namespace_the_service_learns_its_own_pid():
    # NVML lists host pids: 777 is this service (20 GiB, what its allocator holds), 888 a neighbour.
    nvml = RecordingNvml(processes=[(777, 21 * GIB), (888, 3 * GIB)], process_util=[(777, 90, 50)])
    monitor = GpuMonitor(nvml, ("handle", 0), interval_s=0)
    monitor.start(own_bytes_hint=20 * GIB)
    current = monitor.current()
    assert [p["pid"] for p in current["neighbours"]] == [888] and 777 in current["own_pids"]
    assert current["own"].startswith("learned")


def test_utilisation_while_the_service_idles_means_an_unlisted_neighbour(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("zimage_trt.runtime.gpu_monitor.time.monotonic", lambda: clock[0])
    nvml = RecordingNvml(processes=[], util=90)  # NVML lists nothing here (another pid namespace)
    busy = [True]
    monitor = GpuMonitor(nvml, ("handle", 0), interval_s=0)
    monitor.start(busy=lambda: busy[0])
    assert monitor.sharing_reason() is None  # busy: the utilisation is ours
    busy[0] = False
    monitor.poll()
    clock[0] += 0.5
    monitor.poll()
    assert monitor.sharing_reason() is None  # our own last kernels still show in NVML's average
    clock[0] += 1.5
    monitor.poll()
    assert "utilisation 90% while this service idles" in monitor.sharing_reason()
    assert monitor.current()["causes"] == ["shared GPU: another process (not listed)"]


def test_the_monitor_samples_in_the_background_and_survives_nvml_errors():
    nvml = RecordingNvml(unsupported={"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetUtilizationRates"})
    monitor = GpuMonitor(nvml, ("handle", 0), interval_s=0.02)
    monitor.start()
    try:
        deadline = time.monotonic() + 10
        while nvml.calls.count("nvmlDeviceGetClockInfo") < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nvml.calls.count("nvmlDeviceGetClockInfo") >= 5
        assert monitor.current()["util_pct"] is None and monitor.current()["sm_clock_mhz"] == 1980.0
    finally:
        monitor.stop()
    assert not monitor._thread.is_alive()


def test_no_cuda_device_no_monitor():
    assert GpuMonitor.for_device("cpu") is None and GpuMonitor.for_device(None) is None
    assert gpu_health.gib(None) == "memory not reported" and gpu_health.gib(1.5 * GIB) == "1.5 GiB"


# -- on a real GPU (the H200 run) -------------------------------------------------------------------
@pytest.mark.gpu
def test_on_a_real_gpu_the_doctor_reads_every_check_and_the_monitor_knows_its_own_context():
    import torch

    report = doctor_report(0)
    assert report["available"], report
    checks = by_name(report)
    for name in ("sm_clock", "temperature", "power", "driver", "other_processes", "free_memory"):
        assert checks[name]["status"] != "unknown", checks[name]
    torch.ones(1, device="cuda")  # this process now holds a context on the GPU
    monitor = GpuMonitor.for_device("cuda", interval_s=0)
    assert monitor is not None
    monitor.start(own_bytes_hint=torch.cuda.memory_reserved())
    current = monitor.current()
    assert current["processes_listed"] >= 0 and os.getpid() not in [p["pid"] for p in current["neighbours"]]
    assert monitor.sharing_reason() is None or current["neighbours"], current  # shared only with a neighbour
