"""Shared pytest configuration and fixtures.

Skips: a run must not go green on tests that did not run.

- Without CUDA (CI) only gpu-marked tests may skip.
- On a CUDA machine (a by-hand `pytest -m gpu` run) a skip is allowed only when its reason is one that
  machine is expected to give, and the machine really is that way: `GPU_MACHINE_SKIPS` pairs each
  expected reason with the condition that makes it true (TensorRT-RTX refuses compute capability 9.0,
  FlashAttention-3 is not installed, ...). "FlashAttention-3 cannot run here" on a machine where FA3 is
  installed (a broken wheel, a wrong torch) fails the run instead of hiding the module.
- `ZIMAGE_ALLOW_SKIPS=1` allows any skip (e.g. a CPU machine without tensorrt-rtx).

Every skip is listed with its reason at the end of the run, expected or not.
"""

import importlib.util
import os
import re
import threading

# Everything in the tests is local: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

ALLOW_SKIPS = "ZIMAGE_ALLOW_SKIPS"


def _installed(module: str) -> bool:
    """Whether `module` is on the path at all (importing it may still fail: that is not 'not installed')."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _rtx_cannot_run_here() -> bool:
    """TensorRT-RTX is installed and cannot target this GPU (it refuses Hopper's 9.0, for one)."""
    if not _installed("tensorrt_rtx") or _capability() is None:
        return False
    from zimage_trt.engines.tensorrt.library import rtx_supported_compute_capabilities

    major, minor = _capability()
    return f"{major}.{minor}" not in rtx_supported_compute_capabilities()


# What each condition says about the machine; the pytester tests replace entries to play other machines.
MACHINE = {
    "tensorrt-rtx is not installed": lambda: not _installed("tensorrt_rtx"),
    "neither tensorrt nor tensorrt-rtx is installed": lambda: not (_installed("tensorrt") or _installed("tensorrt_rtx")),
    "full TensorRT is installed": lambda: _installed("tensorrt"),
    "TensorRT-RTX cannot target this GPU": _rtx_cannot_run_here,
    "no FlashAttention-3 module is installed": lambda: not (_installed("flash_attn_interface")
                                                            or _installed("fa3_fwd_interface")),
    "the GPU is not a Hopper": lambda: _capability() is not None and _capability()[0] != 9,
    "the GPU is older than Ada (8.9)": lambda: _capability() is not None and _capability() < (8, 9),
    "triton is not installed": lambda: not _installed("triton"),
    "CUDA is available (the test is of the CPU-only case)": lambda: torch.cuda.is_available(),
    "the tests run outside the main thread": lambda: threading.current_thread() is not threading.main_thread(),
}

# (regular expression searched in the skip reason, the MACHINE condition that must hold for it).
GPU_MACHINE_SKIPS = (
    (r"TensorRT-RTX is not installed here|tensorrt_rtx unavailable|CI installs tensorrt-rtx-cu13",
     "tensorrt-rtx is not installed"),
    (r"no TensorRT flavour importable here", "neither tensorrt nor tensorrt-rtx is installed"),
    (r"full TensorRT is installed here", "full TensorRT is installed"),
    (r"TensorRT-RTX cannot (run on|target) (this GPU|compute capability)", "TensorRT-RTX cannot target this GPU"),
    (r"FlashAttention-3 cannot run here: no FlashAttention-3 module imports|^no FlashAttention-3 module imports",
     "no FlashAttention-3 module is installed"),
    (r"FlashAttention-3 cannot run here: FlashAttention-3 runs on Hopper", "the GPU is not a Hopper"),
    (r"FP8 needs compute capability 8.9 or newer", "the GPU is older than Ada (8.9)"),
    (r"Triton is not installed", "triton is not installed"),
    (r"the CPU-only limitation|the no-driver case|checks the CPU-only error",
     "CUDA is available (the test is of the CPU-only case)"),
    (r"signals need the main thread", "the tests run outside the main thread"),
)

_skips = []  # (node id, reason, None if unexpected else why it is expected), filled during the session


def gpu_machine_skip_is_expected(reason: str) -> str | None:
    """The condition that makes `reason` an expected skip on this CUDA machine, or None."""
    for pattern, condition in GPU_MACHINE_SKIPS:
        if re.search(pattern, reason) and MACHINE[condition]():
            return condition
    return None


def _expected(reason: str, gpu_marked: bool) -> str | None:
    if torch.cuda.is_available():
        return gpu_machine_skip_is_expected(reason)
    return "a gpu test on a machine without CUDA" if gpu_marked else None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")
    config.addinivalue_line(
        "markers", "slow: builds engines, compiles, spawns processes or runs large loads; -m 'not slow' leaves them out"
    )
    _skips.clear()


def pytest_collection_modifyitems(config, items):
    # A gpu-marked test skips on a machine without CUDA even if it lacks its own skipif.
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False"))


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    # (A report hook, not an item hook: under pytest-xdist the reports reach the controlling process,
    # which decides the exit status; `report.keywords` carries the test's marker names.)
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        _skips.append((report.nodeid, reason, _expected(reason, "gpu" in report.keywords)))


def pytest_collectreport(report):
    # A whole module skipped while it is imported (module-level pytest.skip) carries no marker.
    if report.skipped:
        reason = _skip_reason(report)
        _skips.append((report.nodeid, reason, _expected(reason, gpu_marked=False)))


def _unexpected():
    return [(nodeid, reason) for nodeid, reason, why in _skips if why is None]


def pytest_sessionfinish(session, exitstatus):
    # (NO_TESTS_COLLECTED too: a run whose only module skipped at import must not read as "nothing to do")
    quiet = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    if _unexpected() and os.environ.get(ALLOW_SKIPS) != "1" and session.exitstatus in quiet:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _skips:
        return
    unexpected = _unexpected()
    allowed = os.environ.get(ALLOW_SKIPS) == "1"
    machine = "a CUDA machine" if torch.cuda.is_available() else "a machine without CUDA"
    terminalreporter.section("skipped tests", sep="=", red=bool(unexpected) and not allowed,
                             yellow=bool(unexpected) and allowed, bold=bool(unexpected))
    for nodeid, reason, why in _skips:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}" + (f"  [expected: {why}]" if why else "  [UNEXPECTED]"))
    if unexpected:
        rule = ("only gpu-marked tests may skip" if not torch.cuda.is_available()
                else "a skip must be one of conftest.GPU_MACHINE_SKIPS, with its condition true here")
        terminalreporter.line(
            f"{len(unexpected)} unexpected skip(s) on {machine} ({rule}); "
            + (f"allowed by {ALLOW_SKIPS}=1." if allowed else f"the session FAILS (set {ALLOW_SKIPS}=1 to allow them).")
        )


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: OpenMP fan-out only adds overhead, and on a busy 2-core runner it costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cpu_pipe():
    """A ZImageTRTPipeline over the tiny random model on the CPU (eager static denoiser)."""
    from zimage_trt.pipeline import ZImageTRTPipeline
    from zimage_trt.testing.tiny import make_tiny_components

    pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.close()
