"""diffusers' step callback (`callback_on_step_end(pipe, i, t, kwargs)`) adapted to the loop's
`callback(i, t, latents)`, for every pipeline class."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from .telemetry import Timings


def diffusers_step_callback(pipe, callback, tensor_inputs: list[str], timings: Timings):
    """The loop's callback for `callback` (None when there is nothing to do). On CPU it also times each
    step (on CUDA the loop times steps with events, without syncing)."""
    timing_steps = pipe.device.type != "cuda"
    if callback is None and not timing_steps:
        return None
    last = [time.perf_counter()]

    def on_step(index: int, timestep: torch.Tensor, latents: torch.Tensor):
        replaced = None
        if callback is not None:
            # The loop's latents are a reused buffer; a callback that keeps them must see this step's values.
            current = latents.clone()
            kwargs = {name: current for name in tensor_inputs}
            outputs = callback(pipe, index, timestep, kwargs)
            outputs = {} if outputs is None else outputs
            if not isinstance(outputs, Mapping):
                raise TypeError(
                    f"callback_on_step_end must return a dict (or None), got {type(outputs).__name__} at step {index}"
                )
            replaced = outputs.get("latents", current if "latents" in tensor_inputs else None)
            if replaced is not None and replaced is not current and (
                not isinstance(replaced, torch.Tensor) or replaced.shape != current.shape
            ):
                got = f"shape {tuple(replaced.shape)}" if isinstance(replaced, torch.Tensor) else type(replaced).__name__
                raise ValueError(
                    f"callback_on_step_end returned latents of {got} at step {index}; "
                    f"expected a tensor of shape {tuple(current.shape)}"
                )
        if timing_steps:
            now = time.perf_counter()
            timings.step_ms.append((now - last[0]) * 1000.0)
            last[0] = now
        return replaced

    return on_step
