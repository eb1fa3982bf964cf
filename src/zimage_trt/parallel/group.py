"""The process group of a sequence-parallel run: one process per GPU (torchrun), checked and timed out.

Two groups: the data group (NCCL on GPUs, gloo on CPUs) carries the attention all-to-alls, the output
gather and each call's inputs, with a short timeout so that a rank that dies makes the others fail
within it; the control group (gloo) carries only "here is the next call" / "stop", with a long
timeout, so that ranks other than 0 can wait idle between calls (a served pipeline) without tripping
the data group's timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this means a rank died or hung
DEFAULT_IDLE_TIMEOUT_S = 30 * 24 * 3600.0  # how long ranks other than 0 wait for the next call
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SequenceParallelError(RuntimeError):
    """A sequence-parallel run cannot start, or another rank failed, died or timed out during a call."""


def valid_degrees(heads: int) -> list[int]:
    """Degrees a model with `heads` attention heads can be split into: 2 up to `heads` (each rank attends
    with ceil(heads / degree) of them; where the degree does not divide the heads, zero heads pad them:
    `parallel/attention.py`)."""
    return list(range(2, heads + 1))


def heads_per_rank(heads: int, degree: int) -> int:
    """Heads each rank attends with: ceil(heads / degree); zero heads fill the last shares (the one
    definition: `padded_heads` and parallel/attention.py derive from it)."""
    return -(-heads // degree)


def padded_heads(degree: int, heads: int) -> int:
    """The zero heads a degree adds (0 where it divides the heads): Z-Image's 30 at 4 or 8 GPUs: 2."""
    return 0 if degree <= 1 else heads_per_rank(heads, degree) * degree - heads


def check_degree(degree, heads: int) -> int:
    """`degree` as an int, or a ValueError naming the degrees this model allows (1 = off)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"sequence_parallel must be an int >= 1 (1 = one process), got {degree!r}")
    if degree > heads:
        raise ValueError(
            f"sequence_parallel={degree} is more processes than the model's {heads} attention heads (each rank "
            f"attends with at least one of them); valid degrees for this model: 2 to {heads}")
    return degree


def check_launch(degree: int) -> None:
    """A SequenceParallelError unless this process was started for a group (torchrun, or a group already up);
    cheap, so a caller can check before loading a model."""
    if degree == 1 or (dist.is_available() and dist.is_initialized()):
        return
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise SequenceParallelError(
            f"sequence_parallel={degree} runs one process per GPU: start it with "
            f"`torchrun --nproc-per-node {degree} ...` (the environment lacks {', '.join(missing)})")


@dataclass
class ParallelGroup:
    """The ranks that make one image together."""

    degree: int
    rank: int
    device: torch.device
    data: dist.ProcessGroup  # attention all-to-alls, output gather, call inputs
    control: dist.ProcessGroup  # next-call / stop messages between calls (gloo, long timeout)
    timeout_s: float
    owns_default_group: bool  # we initialised torch.distributed, so we shut it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()


def join(degree: int, device: torch.device, *, timeout_s: float = DEFAULT_TIMEOUT_S,
         idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> ParallelGroup:
    """Join (or start) torch.distributed for `degree` processes; the world must be exactly `degree`."""
    if not dist.is_available():
        raise SequenceParallelError("sequence_parallel needs torch.distributed, which this torch build lacks")
    check_launch(degree)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        owns = True
    world = dist.get_world_size()
    if world != degree:
        if owns:
            dist.destroy_process_group()
        raise SequenceParallelError(
            f"sequence_parallel={degree} but {world} processes were started: run "
            f"`torchrun --nproc-per-node {degree} ...` (one process per GPU of the group)")
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=idle_timeout_s))
    return ParallelGroup(degree=degree, rank=dist.get_rank(), device=device, data=dist.group.WORLD,
                         control=control, timeout_s=timeout_s, owns_default_group=owns)
