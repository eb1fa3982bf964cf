"""The command line as a new user meets it: every option of every subcommand explained, with its default;
one precision rule for what `build` makes and what `generate` looks for."""

import argparse

import pytest
import torch

from zimage_trt import cli
from zimage_trt.compiler.build import default_build_precision, resolve_backend
from zimage_trt.model.precision import DEFAULT_PRECISION_RULE, RUN_PRECISION_RULE, default_precision, run_precision


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


def is_hidden_alias(parser, action) -> bool:
    """An undocumented option that only spells another, documented option of the parser another way."""
    return action.default is argparse.SUPPRESS and any(
        other is not action and other.dest == action.dest and other.help not in (None, argparse.SUPPRESS)
        for other in parser._actions)


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
            if action.help == argparse.SUPPRESS and is_hidden_alias(parser, action):
                continue  # an old spelling of a documented option
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


def test_one_engine_folder_flag_in_every_subcommand_and_the_old_names_still_work(monkeypatch):
    parsers = subcommands(monkeypatch)
    monkeypatch.undo()  # (parse_args for real from here)
    for name in ("build", "generate", "bench", "serve"):
        [action] = [a for a in parsers[name]._actions if "--engine-dir" in a.option_strings]
        assert action.dest == "engine_dir" and action.help != argparse.SUPPRESS, name
    build_args = ["--model", "m", "--resolution", "256x256"]
    generate_args = ["--model", "m", "--prompt", "a fox"]
    for name, old, rest in (("build", "--out", build_args), ("generate", "--engines", generate_args),
                            ("bench", "--out", [])):
        parser = parsers[name]
        assert parser.parse_args([*rest, old, "old/"]).engine_dir == "old/", name
        assert parser.parse_args([*rest, "--engine-dir", "new/"]).engine_dir == "new/", name
        assert parser.parse_args(rest).engine_dir == parser.get_default("engine_dir"), name  # the alias sets no default
        assert old not in parser.format_help(), name  # hidden


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_generate_and_serve_state_one_precision_rule(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert RUN_PRECISION_RULE in text


def test_serve_and_generate_pick_the_same_precision(monkeypatch):
    """What serve's pipeline is made with equals what generate looks for, engines or not."""
    from zimage_trt.serving import command
    from zimage_trt.serving.settings import add_arguments

    made = {}
    monkeypatch.setattr(command.ZImageTRTPipeline, "from_pretrained", lambda model, **options: made.update(options))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        command.pipeline_factory(parser.parse_args(["--model", "m", "--engine-dir", "e"]))()
        assert made["precision"] == cli.generate_precision(None, None) == default_precision(available)
        command.pipeline_factory(parser.parse_args(["--model", "m"]))()  # no engines: the eager model
        assert made["precision"] == run_precision(None, None, with_engines=False) == ("bf16" if available else "fp32")
        assert made["torch_dtype"] == (torch.bfloat16 if available else torch.float32)


@pytest.mark.parametrize("command", ["build", "generate"])
def test_help_states_the_precision_rule(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)
    assert DEFAULT_PRECISION_RULE in text
    assert "(default: None)" not in text  # a default computed at run time is said in words


def test_one_precision_rule_for_build_and_generate(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    # A build for the CPU (auto -> torch-compiled there) makes what generation on the CPU looks for.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", cpu) == "torch-compiled"
    assert default_build_precision("torch-compiled", cpu) == cli.generate_precision(None, None) == "fp32"
    assert cli.generate_precision(None, "cpu") == "fp32"
    # TensorRT engines run on GPUs wherever they are built; on a GPU machine every engine is for the GPU,
    # and generation there looks for the same precision.
    assert default_build_precision("tensorrt-rtx", cpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for backend in ("torch-compiled", "tensorrt", "tensorrt-rtx"):
        assert default_build_precision(backend, gpu) == cli.generate_precision(None, None) == "fp16"
    assert cli.generate_precision(None, "cuda:1") == "fp16"
    # Asked for, a precision is used as it is.
    assert cli.generate_precision("bf16", "cpu") == "bf16"
    assert default_precision(True) == "fp16" and default_precision(False) == "fp32"


def test_build_engines_applies_the_rule_when_no_precision_is_given(tmp_path, monkeypatch):
    """build_engines(precision=None) settles the precision by the rule before building (the building
    itself is replaced: this checks what it was asked to build)."""
    from zimage_trt.compiler import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(build, "_build_locked", lambda plan, started: plan)
    plan = build.build_engines(torch.nn.Linear(1, 1), "256x256", tmp_path, backend="torch-compiled", progress=False)
    assert (plan.precision, plan.target_dtype, plan.name) == ("fp32", torch.float32, "denoiser-torch-compiled-fp32")
