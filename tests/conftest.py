"""Shared pytest configuration and fixtures."""

import os

# Everything in the tests is local: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


# CI must not go green on tests that did not run: without CUDA only gpu-marked tests may skip, unless
# ZIMAGE_ALLOW_SKIPS=1 (e.g. a machine without tensorrt-rtx). On a CUDA machine any skip is allowed.
ALLOW_SKIPS = "ZIMAGE_ALLOW_SKIPS"
_unexpected_skips = []  # (node id, reason), filled during the session


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")
    config.addinivalue_line(
        "markers", "slow: builds engines, compiles, spawns processes or runs large loads; -m 'not slow' leaves them out"
    )
    _unexpected_skips.clear()


def pytest_collection_modifyitems(config, items):
    # A gpu-marked test skips on a machine without CUDA even if it lacks its own skipif.
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False"))


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_runtest_logreport(report):
    # (A report hook, not an item hook: under pytest-xdist the reports reach the controlling process,
    # which decides the exit status; `report.keywords` carries the test's marker names.)
    skip_allowed = torch.cuda.is_available() or "gpu" in report.keywords
    if report.skipped and not hasattr(report, "wasxfail") and not skip_allowed:
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    # A whole module skipped while it is imported (module-level pytest.importorskip) has no gpu marker.
    if report.skipped and not torch.cuda.is_available():
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and os.environ.get(ALLOW_SKIPS) != "1" and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _unexpected_skips:
        return
    allowed = os.environ.get(ALLOW_SKIPS) == "1"
    terminalreporter.section("unexpected skips", sep="=", red=not allowed, yellow=allowed, bold=True)
    terminalreporter.line(
        f"{len(_unexpected_skips)} test(s) without the gpu marker skipped on a machine without CUDA; "
        + (f"allowed by {ALLOW_SKIPS}=1." if allowed else f"the session FAILS (set {ALLOW_SKIPS}=1 to allow them):")
    )
    for nodeid, reason in _unexpected_skips:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}")


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
