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


def drawing_checks(monkeypatch, generator, healer: int | None):
    """Stand-ins on the CPU: `generator` plays the device's default generator, every check draws from it
    (as the real check does), and the generator is unusable until remedy `healer` ran (None: always usable)."""
    names = [name for name, _ in graph_capture.REMEDIES]
    ran = []
    monkeypatch.setattr(graph_capture, "REMEDIES",
                        tuple((name, lambda graph, device, name=name: ran.append(name)) for name in names))
    monkeypatch.setattr(graph_capture, "_default_generator", lambda device: generator)

    def check(device):
        torch.empty(1).uniform_(generator=generator)
        return healer is None or names[healer] in ran

    monkeypatch.setattr(graph_capture, "_random_op_works", check)
    return ran


@pytest.mark.parametrize("healer", [None, 2])
def test_the_checks_leave_the_default_generators_seed_and_offset_as_they_were(monkeypatch, healer):
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)  # an offset of its own
    expected = torch.rand(4, generator=torch.Generator().set_state(generator.get_state()))
    drawing_checks(monkeypatch, generator, healer)
    graph_capture.recover_after_failed_capture("cuda:0")
    assert torch.equal(torch.rand(4, generator=generator), expected), "noise drawn later is unchanged"


def test_the_generator_is_put_back_when_the_recovery_itself_raises(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(5))
    drawing_checks(monkeypatch, generator, healer=None)
    original = graph_capture._random_op_works

    def check_then_interrupted(device):
        original(device)
        raise KeyboardInterrupt

    monkeypatch.setattr(graph_capture, "_random_op_works", check_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        graph_capture.recover_after_failed_capture("cuda:0")
    assert torch.equal(torch.rand(4, generator=generator), expected)


def test_the_real_check_on_the_cpu_generator_is_undone():
    """The pieces themselves: the real check draws from the default generator; inside `_generator_kept`
    that draw is undone."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with graph_capture._generator_kept(torch.device("cpu")):
        assert graph_capture._random_op_works(torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)
