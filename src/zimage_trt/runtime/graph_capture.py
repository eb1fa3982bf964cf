"""What a CUDA graph capture that fails leaves behind, put right (the denoising loop and the text encoder).

A capture that fails part way (a host sync in the captured code, memory running out) leaves torch's
default CUDA generator of that device mid-capture: every later random op on it raises "Offset increment
outside graph capture encountered unexpectedly" (seen on an H200 with torch 2.11 after the text encoder's
capture fell back to eager), so a caller's noise drawn without a generator would fail from then on.
`recover_after_failed_capture` tries the remedies torch offers, cheapest first, and checks each with one
random op; the generator keeps its seed and offset: its state is saved before the first check (which
draws from it, even when nothing is wrong) and put back on every way out, so noise drawn later without a
generator is what it would have been had no capture failed.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

log = logging.getLogger(__name__)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type != "cuda":
        return torch.default_generator
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _generator_kept(device: torch.device):
    """The default generator of `device` with the seed and offset it had on entry, on every way out (the
    checks and the empty capture draw from it)."""
    try:
        generator = _default_generator(device)
        saved = generator.get_state()
    except (RuntimeError, IndexError) as error:  # (no such generator, or a state torch cannot read)
        log.debug("could not save the default generator's state before the capture checks: %s", error)
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            try:
                generator.set_state(saved)
            except RuntimeError as error:
                log.warning("could not restore the default generator's seed and offset after a failed CUDA graph "
                            "capture: %s", error)


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
    with _generator_kept(device):
        return _recover(device, graph)


def _recover(device: torch.device, graph) -> str | None:
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
                  "pass generator=torch.Generator('cuda').manual_seed(...) to draw noise", RuntimeWarning, stacklevel=3)
    return None
