"""What a CUDA graph capture that fails leaves behind, put right (the denoising loop and the text encoder).

A capture that fails part way (a host sync in the captured code, memory running out) leaves torch's
default CUDA generator of that device mid-capture: every later random op on it raises "Offset increment
outside graph capture encountered unexpectedly" (seen on an H200 with torch 2.11 after the text encoder's
capture fell back to eager), so a caller's noise drawn without a generator would fail from then on.
`recover_after_failed_capture` tries the remedies torch offers, cheapest first, and checks each with one
random op; the generator keeps its seed and offset.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)


def _random_op_works(device: torch.device) -> bool:
    try:
        torch.empty(1, device=device).uniform_()  # (draws on the default generator: this path only)
        return True
    except RuntimeError:
        return False


def _reset_graph(graph, device) -> None:
    if graph is not None:
        graph.reset()


def _fresh_generator_state(graph, device) -> None:
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())  # same seed and offset, no capture bookkeeping


def _empty_capture(graph, device) -> None:
    healthy = torch.cuda.CUDAGraph()
    with torch.cuda.graph(healthy):
        torch.empty(1, device=device).uniform_()
    del healthy


REMEDIES = (("reset the failed graph", _reset_graph), ("a fresh copy of the generator's state", _fresh_generator_state),
            ("one capture that succeeds", _empty_capture))


def recover_after_failed_capture(device, graph=None) -> str | None:
    """After a capture on `device` failed: make the default CUDA generator usable again. Returns the remedy
    that did it (None: nothing needed one); warns if none did (pass a torch.Generator to the pipeline then)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if _random_op_works(device):
        return None
    for name, remedy in REMEDIES:
        try:
            remedy(graph, device)
        except Exception as error:  # a remedy this torch lacks or refuses: try the next one
            log.debug("after a failed CUDA graph capture, %s failed: %s", name, error)
            continue
        if _random_op_works(device):
            log.info("after a failed CUDA graph capture, %s made the default CUDA generator usable again", name)
            return name
    warnings.warn("a failed CUDA graph capture left torch's default CUDA generator unusable in this process; "
                  "pass generator=torch.Generator('cuda').manual_seed(...) to draw noise", RuntimeWarning, stacklevel=2)
    return None
