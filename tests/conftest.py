"""Shared pytest configuration and fixtures."""

import os

# Everything in the tests is local: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")


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
    from zimage_trt.tiny import make_tiny_components

    pipe = ZImageTRTPipeline.from_components(**make_tiny_components(seed=0), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.close()
