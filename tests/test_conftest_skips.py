"""conftest.py's skip rules, run in small inner pytest sessions (pytest's `pytester`), each with the real
conftest and a pretended machine: without CUDA only gpu-marked tests may skip; on a CUDA machine only the
skips `GPU_MACHINE_SKIPS` expects, and only where their condition holds; every skip is listed at the end."""

import re
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
FAILED, OK = pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.OK

INNER = '''
import pytest

@pytest.mark.gpu
def test_gpu_marked_skip():
    pytest.skip({gpu_reason!r})

def test_plain_skip():
    pytest.skip({plain_reason!r})

def test_runs():
    pass
'''


def inner_session(pytester, monkeypatch, *, cuda: bool, machine=None, allow=False, gpu_reason="x", plain_reason="x",
                  source=None):
    """An inner session over the real conftest; `machine` sets conftest.MACHINE conditions (name -> bool)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H200
    overrides = "".join(f"\nMACHINE[{name!r}] = lambda: {value!r}" for name, value in (machine or {}).items())
    pytester.makeconftest(CONFTEST + overrides)
    pytester.makepyfile(test_inner=source or INNER.format(gpu_reason=gpu_reason, plain_reason=plain_reason))
    if allow:
        monkeypatch.setenv("ZIMAGE_ALLOW_SKIPS", "1")
    else:
        monkeypatch.delenv("ZIMAGE_ALLOW_SKIPS", raising=False)
    return pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider")


def test_without_cuda_only_gpu_marked_tests_may_skip(pytester, monkeypatch):
    only_gpu = inner_session(pytester, monkeypatch, cuda=False,
                             source="import pytest\n@pytest.mark.gpu\ndef test_g():\n    pass\ndef test_r():\n    pass\n")
    assert only_gpu.ret == OK
    only_gpu.stdout.fnmatch_lines(["SKIPPED test_inner.py::test_g: gpu test: torch.cuda.is_available() is False  "
                                   "[expected: a gpu test on a machine without CUDA]"])
    result = inner_session(pytester, monkeypatch, cuda=False, plain_reason="a library is missing")
    assert result.ret == FAILED
    result.stdout.fnmatch_lines(["*skipped tests*", "SKIPPED test_inner.py::test_plain_skip: a library is missing  [UNEXPECTED]",
                                 "1 unexpected skip(s) on a machine without CUDA (only gpu-marked tests may skip); "
                                 "the session FAILS*"])
    result.assert_outcomes(passed=1, skipped=2)  # (the gpu-marked one was skipped by the conftest, expected)
    assert inner_session(pytester, monkeypatch, cuda=False, allow=True).ret == OK


def test_a_module_skipped_at_import_is_unexpected_without_cuda(pytester, monkeypatch):
    source = "import pytest\npytest.skip('no such library', allow_module_level=True)\n"
    result = inner_session(pytester, monkeypatch, cuda=False, source=source)
    assert result.ret == FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_inner.py: no such library  [UNEXPECTED]"])


def test_on_a_gpu_machine_expected_skips_pass_where_their_condition_holds(pytester, monkeypatch):
    rtx = "TensorRT-RTX is not installed here: `import tensorrt_rtx` failed: ModuleNotFoundError"
    machine = {"tensorrt-rtx is not installed": True, "triton is not installed": True}
    result = inner_session(pytester, monkeypatch, cuda=True, machine=machine, gpu_reason="Triton is not installed",
                           plain_reason=rtx)
    assert result.ret == OK, result.stdout.str()
    result.stdout.fnmatch_lines([
        "SKIPPED test_inner.py::test_gpu_marked_skip: Triton is not installed  [expected: triton is not installed]",
        f"SKIPPED test_inner.py::test_plain_skip: {rtx}  [expected: tensorrt-rtx is not installed]"])
    # The same reason where it is false (TensorRT-RTX installed: its import failed for another cause).
    result = inner_session(pytester, monkeypatch, cuda=True, machine={**machine, "tensorrt-rtx is not installed": False},
                           gpu_reason="Triton is not installed", plain_reason=rtx)
    assert result.ret == FAILED
    result.stdout.fnmatch_lines([f"SKIPPED test_inner.py::test_plain_skip: {rtx}  [UNEXPECTED]",
                                 "1 unexpected skip(s) on a CUDA machine*"])


def test_on_a_gpu_machine_an_unexpected_skip_fails_even_gpu_marked(pytester, monkeypatch):
    # The planted case: FA3 installed, but its import fails (a wheel built for another torch): the FA3
    # tests must not go quietly.
    fa3 = "FlashAttention-3 cannot run here: no FlashAttention-3 module imports (flash_attn_interface, fa3_fwd_interface)"
    result = inner_session(pytester, monkeypatch, cuda=True, machine={"no FlashAttention-3 module is installed": False},
                           gpu_reason=fa3, plain_reason="a flaky fixture")
    assert result.ret == FAILED
    result.stdout.fnmatch_lines([f"SKIPPED test_inner.py::test_gpu_marked_skip: {fa3}  [UNEXPECTED]",
                                 "SKIPPED test_inner.py::test_plain_skip: a flaky fixture  [UNEXPECTED]",
                                 "2 unexpected skip(s) on a CUDA machine*FAILS*"])
    assert inner_session(pytester, monkeypatch, cuda=True, machine={"no FlashAttention-3 module is installed": True},
                         gpu_reason=fa3, plain_reason="a flaky fixture", allow=True).ret == OK


def test_the_h200_skip_reasons_are_on_the_list():
    """The reasons the gpu tests give on the H200 (no TensorRT, FA3 and Triton installed) match an entry."""
    import conftest  # the module pytest loaded (tests/ is on sys.path as the rootdir-relative test folder)

    rtx_reasons = ["TensorRT-RTX is not installed here: TensorRT flavor 'tensorrt-rtx' is not available",
                   "no TensorRT flavour importable here: {'tensorrt': (False, ...)}",
                   "TensorRT-RTX cannot run on compute capability 9.0",
                   "TensorRT-RTX cannot target this GPU (sm 9.0); install full TensorRT to run here",
                   "CI installs tensorrt-rtx-cu13: ...", "tensorrt_rtx unavailable: ..."]
    found = {reason: [c for p, c in conftest.GPU_MACHINE_SKIPS if re.search(p, reason)]
             for reason in rtx_reasons + ["Triton is not installed", "the CPU-only limitation",
                                          "FlashAttention-3 cannot run here: FlashAttention-3 runs on Hopper (compute "
                                          "capability 9.x); this GPU is 8.9"]}
    assert all(len(conditions) == 1 for conditions in found.values()), found
    assert not [p for p, _ in conftest.GPU_MACHINE_SKIPS if re.search(p, "a flaky fixture")]
    assert {c for _, c in conftest.GPU_MACHINE_SKIPS} <= set(conftest.MACHINE)
