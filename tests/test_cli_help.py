"""Every ``dlplora`` subcommand answers ``--help`` (exit 0, its own usage line) without running anything."""

import argparse

import pytest

from dlplora_triton.cli import _build_parser, main


def _subcommands() -> list[str]:
    (sub,) = [a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_the_command_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in _subcommands():
        assert name in printed


@pytest.mark.parametrize("command", _subcommands())
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: dlplora") and command in usage, usage
