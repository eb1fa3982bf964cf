"""Benchmark jobs in their own processes, in two phases: prepare (load, quantise, compile, warm up) and
measure (the timed images), with a bounded wait on each.

Why processes: a compile that runs long (torchao's FP8 peer did not finish in 500 s on an H200) can
only be stopped by ending its process; a thread would go on compiling beside the next measurement.
Why two phases: several jobs may prepare at once (compilation is CPU work, and nothing is timed then),
while the measure phases run one at a time, so no job is timed beside another's work. A prepared job
holds its GPU memory until its turn, so callers group jobs into waves that fit the card.

The protocol is lines on the child's stdout: `@@PHASED READY {...}` after prepare; with
ZIMAGE_PHASED=1 in its environment the child then waits for a line on stdin before measuring;
`@@PHASED RESULT {...}` at the end; `@@PHASED MISSING {...}` when an optional package is absent;
`@@PHASED ERROR {...}` on a failure. Everything else the child prints goes to its log file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL = "@@PHASED"
PHASED_ENV = "ZIMAGE_PHASED"
MISSING_EXIT = 3


# -- the child's side ------------------------------------------------------------------------------
def announce(kind: str, payload: dict | None = None) -> None:
    print(f"{PROTOCOL} {kind} {json.dumps(payload or {}, default=float)}", flush=True)


def ready(info: dict | None = None) -> None:
    """Say that prepare is done; under a phased parent, wait for its go before returning."""
    announce("READY", info)
    if os.environ.get(PHASED_ENV) == "1":
        if not sys.stdin.readline():  # the parent went away: nothing left to measure for
            sys.exit(0)


def require(*modules: str) -> None:
    """Import each optional module now; one that does not import is announced MISSING and the process ends."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # absent, or built for another torch/CUDA: not usable either way
            announce("MISSING", {"module": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            sys.exit(MISSING_EXIT)


def run_worker(prepare, measure) -> int:
    """prepare() -> state (timed), ready(), measure(state) -> dict; RESULT or ERROR announced."""
    try:
        start = time.perf_counter()
        state = prepare()
        ready({"prepare_s": time.perf_counter() - start})
        announce("RESULT", measure(state))
        return 0
    except Exception as error:
        traceback.print_exc()
        announce("ERROR", {"error": f"{type(error).__name__}: {str(error)[:500]}"})
        return 1


# -- the parent's side -----------------------------------------------------------------------------
@dataclass
class Job:
    """One child process: `argv` runs a worker; its waits are bounded by the two timeouts (seconds)."""
    name: str
    argv: list[str]
    prepare_timeout_s: float = 600.0
    measure_timeout_s: float = 600.0
    env: dict = field(default_factory=dict)


class PhasedProcess:
    """A started job: its output goes to `log`; protocol lines update `status`."""

    def __init__(self, job: Job, log_dir: str | os.PathLike):
        self.job = job
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / f"{job.name}.log"
        self.started = time.perf_counter()
        self.messages: dict[str, dict] = {}
        self._changed = threading.Condition()
        env = {**os.environ, **job.env, PHASED_ENV: "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")
        # Its own session, so that ending it ends its compile workers too (they are its children).
        self.process = subprocess.Popen(job.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):  # (the log closed by close() after a kill)
                self._log.write(line)
                self._log.flush()
            if line.startswith(PROTOCOL + " "):
                _, kind, payload = line.rstrip("\n").split(" ", 2)
                with self._changed:
                    self.messages[kind] = json.loads(payload)
                    self._changed.notify_all()
        self.process.wait()
        with self._changed:
            self.messages.setdefault("EXIT", {"code": self.process.returncode})
            self._changed.notify_all()

    def _wait_for(self, kind: str, deadline: float) -> str:
        """'ok' when `kind` arrived, else why not: 'missing', 'failed' or 'timeout'."""
        with self._changed:
            while True:
                if kind in self.messages:
                    return "ok"
                if "MISSING" in self.messages:
                    return "missing"
                if "ERROR" in self.messages or "EXIT" in self.messages:
                    return "failed"
                left = deadline - time.perf_counter()
                if left <= 0:
                    return "timeout"
                self._changed.wait(min(left, 1.0))

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        timeout_s = self.job.prepare_timeout_s if timeout_s is None else timeout_s
        return self._outcome("READY", self.started + timeout_s, "prepare", timeout_s)

    def measure(self, timeout_s: float | None = None) -> dict:
        """Let the child measure (after wait_ready said ok) and wait for its result."""
        timeout_s = self.job.measure_timeout_s if timeout_s is None else timeout_s
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        outcome = self._outcome("RESULT", time.perf_counter() + timeout_s, "measure", timeout_s)
        self.close()
        return outcome

    def _outcome(self, kind: str, deadline: float, phase: str, timeout_s: float) -> dict:
        status = self._wait_for(kind, deadline)
        elapsed = time.perf_counter() - self.started
        if status == "ok":
            return {"status": "ok", **self.messages.get("READY", {}), **self.messages.get(kind, {})}
        if status == "missing":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)  # it ends itself after saying so
        self.close()
        if status == "missing":
            info = self.messages["MISSING"]
            return {"status": "missing", "detail": f"not installed: {info['module']} ({info['error']})",
                    "exit_code": self.process.returncode}
        if status == "timeout":
            return {"status": "timeout", "detail": f"did not finish {phase} in {timeout_s:.0f} s", "elapsed_s": elapsed}
        error = self.messages.get("ERROR", {}).get("error") or f"exited with code {self.process.returncode}"
        return {"status": "failed", "detail": f"{phase} failed: {error} (log: {self.log_path})", "elapsed_s": elapsed}

    def close(self) -> None:
        """End the child (and its compile workers) if it still runs."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=5)
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self._log.close()


def run_wave(jobs: list[Job], log_dir, *, deadline: float | None = None, report=print) -> dict[str, dict]:
    """Start every job of the wave at once (their prepare phases overlap); when all are ready (or
    failed, or past their wait), let each measure in turn, in the order given, so that nothing else
    runs while one is timed. A job's prepare wait ends at its own timeout or at `deadline` (a
    time.perf_counter() value), whichever comes first; a measure wait ends at its timeout or the
    deadline too. Returns each job's outcome by name."""
    running = [PhasedProcess(job, log_dir) for job in jobs]
    outcomes = {}
    try:
        for proc in running:
            timeout = proc.job.prepare_timeout_s
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - proc.started))
            outcomes[proc.job.name] = proc.wait_ready(timeout)
            if outcomes[proc.job.name]["status"] != "ok":
                report(f"{proc.job.name}: {describe(outcomes[proc.job.name])}")
        for proc in running:
            if outcomes[proc.job.name]["status"] == "ok":
                timeout = proc.job.measure_timeout_s
                if deadline is not None:
                    timeout = max(1.0, min(timeout, deadline - time.perf_counter()))
                outcomes[proc.job.name] = proc.measure(timeout)
                report(f"{proc.job.name}: {describe(outcomes[proc.job.name])}")
    finally:
        for proc in running:
            proc.close()
    return outcomes


def describe(outcome: dict) -> str:
    if outcome["status"] == "ok":
        return f"done (prepare {outcome['prepare_s']:.1f} s)" if "prepare_s" in outcome else "done"
    return f"{outcome['status']}: {outcome['detail']}"
