"""`GenerationQueue`: many threads submit, one worker thread drives the GPU.

One GPU runs one generation at a time fastest: interleaving requests from several threads only adds
contention (and CUDA graphs are captured per stream). So requests wait in a bounded FIFO and a single
worker runs them in order. Each request gets a `concurrent.futures.Future`:

    with GenerationQueue(pipe) as queue:
        future = queue.submit(prompt="a red fox", generator=torch.Generator().manual_seed(1))
        image = future.result().images[0]

- bounded: `submit` raises `QueueFullError` at once when `max_pending` requests are waiting, so
  callers shed load instead of piling up latency;
- `future.cancel()` on a waiting request removes it; it never runs;
- a request that raises fails only its own Future; the worker goes on with the next one;
- the result's `timings` gain `queue_wait_ms` (submit -> start) and `run_ms` (start -> done).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFullError(RuntimeError):
    """The queue already holds `max_pending` waiting requests."""


class QueueClosedError(RuntimeError):
    """`submit` after `close()`."""


@dataclass
class _Request:
    kwargs: dict
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


class GenerationQueue:
    """A bounded FIFO of generation requests served by one worker thread calling `pipe(**kwargs)`."""

    def __init__(self, pipe, max_pending: int = 32, name: str = "zimage-trt-worker"):
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.pipe = pipe
        self.max_pending = max_pending
        self._waiting: deque[_Request] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        # Daemon: a forgotten queue must not keep the interpreter alive at exit.
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    # -- client side ---------------------------------------------------------------------------
    def submit(self, **kwargs) -> Future:
        """Queue `pipe(**kwargs)`; returns its Future. Raises QueueFullError / QueueClosedError at once."""
        request = _Request(kwargs)
        with self._wakeup:
            if self._closed:
                raise QueueClosedError("this GenerationQueue is closed; create a new one")
            if len(self._waiting) >= self.max_pending:
                raise QueueFullError(
                    f"generation queue is full: {len(self._waiting)} requests waiting (max_pending="
                    f"{self.max_pending}); retry later or raise max_pending"
                )
            self._waiting.append(request)
            self._wakeup.notify()
        # A cancelled request leaves the queue at once, freeing its slot for new submissions.
        request.future.add_done_callback(lambda future: self._forget(request) if future.cancelled() else None)
        return request.future

    @property
    def pending(self) -> int:
        """Requests waiting to start (the running one excluded)."""
        with self._wakeup:
            return len(self._waiting)

    def close(self, cancel_pending: bool = False, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; by default finish the waiting ones, then stop the worker."""
        with self._wakeup:
            self._closed = True
            dropped = list(self._waiting) if cancel_pending else []
            if cancel_pending:
                self._waiting.clear()
            self._wakeup.notify_all()
        for request in dropped:
            request.future.cancel()
        if wait and threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "GenerationQueue":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- worker side ---------------------------------------------------------------------------
    def _forget(self, request: _Request) -> None:
        with self._wakeup:
            try:
                self._waiting.remove(request)
            except ValueError:  # the worker already took it
                pass

    def _next_request(self) -> _Request | None:
        with self._wakeup:
            while not self._waiting and not self._closed:
                self._wakeup.wait()
            return self._waiting.popleft() if self._waiting else None

    def _serve(self) -> None:
        while (request := self._next_request()) is not None:
            # False when the request was cancelled after we took it: it must not run.
            if request.future.set_running_or_notify_cancel():
                self._run(request)

    def _run(self, request: _Request) -> None:
        started = time.perf_counter()
        try:
            output = self.pipe(**request.kwargs)
        except BaseException as error:  # noqa: BLE001 - the error belongs to this request only
            request.future.set_exception(error)
            return
        timings = getattr(output, "timings", None)
        if timings is not None:
            timings.queue_wait_ms = (started - request.submitted_at) * 1000.0
            timings.run_ms = (time.perf_counter() - started) * 1000.0
        request.future.set_result(output)
