"""runtime/graph_capture.py: after a failed CUDA graph capture the remedies run cheapest first until one
random op works again (the GPU case itself: tests/test_text_encoder_and_output.py, the host-sync fallback)."""

import pytest
import torch

from zimage_trt.runtime import graph_capture


def test_nothing_to_do_on_the_cpu():
    assert graph_capture.recover_after_failed_capture("cpu") is None


def stand_in_remedies(monkeypatch, healer: int | None):
    """The real remedies' names; the first raises (a remedy this torch lacks), and the generator stays
    unusable until remedy number `healer` has run (None: none heals it). Returns (names run, all names)."""
    names = [name for name, _ in graph_capture.REMEDIES]
    ran = []

    def remedy(name):
        def run(graph, device):
            ran.append(name)
            if name == names[0]:
                raise RuntimeError(f"{name}: not in this torch")
        return run

    monkeypatch.setattr(graph_capture, "REMEDIES", tuple((name, remedy(name)) for name in names))
    monkeypatch.setattr(graph_capture, "_random_op_works", lambda device: healer is not None and names[healer] in ran)
    return ran, names


def test_the_first_remedy_that_works_is_the_last_one_run(monkeypatch):
    ran, names = stand_in_remedies(monkeypatch, healer=1)
    assert graph_capture.recover_after_failed_capture("cuda:0") == names[1]
    assert ran == names[:2]  # the first raised (skipped), the second healed it, the third never ran


def test_a_generator_nothing_heals_is_said(monkeypatch):
    ran, names = stand_in_remedies(monkeypatch, healer=None)
    with pytest.warns(RuntimeWarning, match="pass generator=torch.Generator"):
        assert graph_capture.recover_after_failed_capture(torch.device("cuda", 0)) is None
    assert ran == names
