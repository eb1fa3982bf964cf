"""The command line as a new user meets it: every option of every subcommand explained, with its default;
one precision rule for what `build` makes and what `generate` looks for."""

import argparse

import pytest
import torch

from zimage_trt import cli
from zimage_trt.model.precision import DEFAULT_PRECISION_RULE, default_precision, precision_dtype
from zimage_trt.runtime.placement import default_dtype


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def top_parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser `main` builds (caught at parse time, before anything runs)."""
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        cli.main([])
    return caught.value.parser


def subcommands(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    top = top_parser(monkeypatch)
    (choices,) = [a.choices for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default(monkeypatch):
    parsers = subcommands(monkeypatch)
    assert {"build", "generate", "bench", "demo"} <= set(parsers)
    problems = []
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            option = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{option}: no help line")
                continue
            shown = formatter._get_help_string(action)
            if action.required:
                if not action.help.startswith("required"):
                    problems.append(f"{option}: required, and its help does not say so first")
            elif "default" not in shown:
                problems.append(f"{option}: its default is not shown")
            if not isinstance(parser.formatter_class, type) or not issubclass(
                    parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
                problems.append(f"{name}: help formatter {parser.formatter_class} does not show defaults")
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("command", ["build", "generate"])
def test_help_states_the_precision_rule(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)
    assert DEFAULT_PRECISION_RULE in text
    assert "(default: None)" not in text  # a default computed at run time is said in words


def test_one_precision_rule_for_build_generate_and_the_pipeline(monkeypatch):
    # On this machine's CPU: a build for the CPU (auto -> torch-compiled) and generation on the CPU agree.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.build_precision("auto") == cli.generate_precision(None, None) == "fp32"
    assert cli.generate_precision(None, "cpu") == "fp32"
    assert precision_dtype(cli.generate_precision(None, "cpu")) == default_dtype(torch.device("cpu"))
    # On a GPU machine: every build is for the GPU, and generation there looks for the same precision.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.build_precision("torch-compiled") == cli.generate_precision(None, None) == "bf16"
    assert cli.generate_precision(None, "cuda:1") == "bf16"
    assert precision_dtype("bf16") == default_dtype(torch.device("cuda", 0))
    # Asked for, a precision is used as it is.
    assert cli.generate_precision("fp16", "cpu") == "fp16"
    assert default_precision(True) == "bf16" and default_precision(False) == "fp32"


def test_a_tensorrt_build_without_a_gpu_is_for_a_gpu(monkeypatch):
    """TensorRT-RTX engines built on a CPU-only machine run on GPUs: bf16 by the same rule."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "resolve_backend", lambda backend, device: backend)
    assert cli.build_precision("tensorrt-rtx") == "bf16"
    assert cli.build_precision("torch-compiled") == "fp32"
