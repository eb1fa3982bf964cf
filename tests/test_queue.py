"""GenerationQueue: one GPU worker behind a bounded, thread-safe FIFO (CPU, tiny model)."""


import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch


from zimage_trt.runtime.queue import GenerationQueue, QueueClosedError, QueueFullError
from zimage_trt.runtime.telemetry import Timings

WAIT_S = 60  # generous: a loaded CI runner is slow, a hang is still caught


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pipe(tiny_cpu_pipe):
    return tiny_cpu_pipe


def request(seed: int, **extra) -> dict:
    kwargs = dict(
        prompt=f"request {seed}: a red fox",
        height=256,
        width=256,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return {**kwargs, **extra}


class BlockingPipe:
    """Stands in for the pipeline where only the queue's behaviour matters: records calls, and
    blocks each call until `release` is set, so the test controls what is waiting."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs["tag"])
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("test never released the pipe")
        return type("Output", (), {"timings": Timings(), "tag": kwargs["tag"]})()


def test_sixteen_requests_from_four_threads_match_solo_runs(pipe):
    solo = {seed: pipe(**request(seed)).images for seed in range(16)}
    futures = {}
    lock = threading.Lock()

    def client(seeds):
        for seed in seeds:
            future = pipe.submit(**request(seed))
            with lock:
                futures[seed] = future

    threads = [threading.Thread(target=client, args=(range(k, 16, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(futures) == 16
    for seed, future in futures.items():
        out = future.result(timeout=WAIT_S)
        np.testing.assert_array_equal(out.images, solo[seed])
        assert out.timings.queue_wait_ms >= 0 and out.timings.run_ms > 0
        assert out.timings.run_ms >= out.timings.total_ms  # run_ms wraps the whole call


def test_full_queue_raises_at_once():
    fake = BlockingPipe()
    queue = GenerationQueue(fake, max_pending=2)
    try:
        running = queue.submit(tag="running")
        assert fake.started.wait(WAIT_S)  # the worker holds it: it no longer counts as pending
        waiting = [queue.submit(tag=f"waiting {i}") for i in range(2)]
        with pytest.raises(QueueFullError, match="max_pending=2"):
            queue.submit(tag="one too many")
        fake.release.set()
        assert [f.result(WAIT_S).tag for f in [running, *waiting]] == ["running", "waiting 0", "waiting 1"]
    finally:
        fake.release.set()
        queue.close()
    assert fake.calls == ["running", "waiting 0", "waiting 1"]  # FIFO, and the rejected one never ran


def test_cancelled_request_never_runs_and_frees_its_slot():
    fake = BlockingPipe()
    queue = GenerationQueue(fake, max_pending=1)
    try:
        first = queue.submit(tag="first")
        assert fake.started.wait(WAIT_S)
        doomed = queue.submit(tag="doomed")
        assert doomed.cancel()
        replacement = queue.submit(tag="replacement")  # the cancelled request's slot is free again
        fake.release.set()
        assert first.result(WAIT_S).tag == "first"
        assert replacement.result(WAIT_S).tag == "replacement"
        with pytest.raises(CancelledError):
            doomed.result(0)
    finally:
        fake.release.set()
        queue.close()
    assert fake.calls == ["first", "replacement"]


def test_running_request_cannot_be_cancelled():
    fake = BlockingPipe()
    with GenerationQueue(fake) as queue:
        running = queue.submit(tag="running")
        assert fake.started.wait(WAIT_S)
        assert not running.cancel()
        fake.release.set()
        assert running.result(WAIT_S).tag == "running"


def test_raising_callback_fails_only_its_request(pipe):
    def broken_callback(p, i, t, kwargs):
        raise RuntimeError("callback exploded")

    with GenerationQueue(pipe) as queue:
        before = queue.submit(**request(1))
        broken = queue.submit(**request(2, callback_on_step_end=broken_callback))
        after = queue.submit(**request(3))
        with pytest.raises(RuntimeError, match="callback exploded"):
            broken.result(WAIT_S)
        before.result(WAIT_S)
        np.testing.assert_array_equal(after.result(WAIT_S).images, pipe(**request(3)).images)


def test_bad_arguments_fail_only_their_request(pipe):
    with GenerationQueue(pipe) as queue:
        bad = queue.submit(**request(1, height=100))
        good = queue.submit(**request(2))
        with pytest.raises(ValueError, match="height=100"):
            bad.result(WAIT_S)
        assert good.result(WAIT_S).images.shape == (1, 256, 256, 3)


def test_close_finishes_waiting_requests_then_refuses_new_ones(pipe):
    queue = GenerationQueue(pipe)
    futures = [queue.submit(**request(seed)) for seed in range(3)]
    queue.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(QueueClosedError):
        queue.submit(**request(4))


def test_close_can_cancel_waiting_requests():
    fake = BlockingPipe()
    queue = GenerationQueue(fake)
    running = queue.submit(tag="running")
    assert fake.started.wait(WAIT_S)
    waiting = queue.submit(tag="waiting")
    queue.close(cancel_pending=True, wait=False)
    fake.release.set()
    queue.close()  # now wait for the worker
    assert running.result(WAIT_S).tag == "running"
    assert waiting.cancelled()
    assert fake.calls == ["running"]


def test_pipe_submit_creates_one_queue_lazily(pipe):
    assert pipe.submit(**request(5)).result(WAIT_S).images.shape == (1, 256, 256, 3)
    first_queue = pipe._queue
    pipe.submit(**request(6)).result(WAIT_S)
    assert pipe._queue is first_queue
    pipe.close()
    assert pipe._queue is None
    pipe.submit(**request(7)).result(WAIT_S)  # a closed pipeline queue is replaced on demand


@pytest.mark.parametrize("max_pending", [0, -1, 1.5, True])
def test_max_pending_must_be_a_positive_int(max_pending):
    with pytest.raises(ValueError, match="max_pending"):
        GenerationQueue(BlockingPipe(), max_pending=max_pending)
