"""Every ``dlplora`` subcommand answers ``--help`` (exit 0, its own usage line) without running anything,
and without importing torch."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from dlplora_triton.cli import _build_parser, main

ROOT = Path(__file__).resolve().parents[2]


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


def _option_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser (finetune's and serve's included: every command module builds its own)."""
    (sub,) = [a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_option_says_what_it_does_and_its_default(command):
    parser = _option_parsers()[command]
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        help_text = action.help or ""
        has_default = action.default not in (None, False) and not action.required
        if not help_text.strip() or (has_default and "default" not in help_text):
            missing.append(f"{'/'.join(action.option_strings)} (default {action.default!r}): {help_text!r}")
    assert not missing, f"dlplora {command}: options without help or without their default: {missing}"


# Run in a fresh interpreter: every command's help, an unknown option and a bad value, then the heavy
# modules it must not have loaded (the package's __init__ imports its public names lazily).
_LIGHT_START = """
import sys
from dlplora_triton.cli import COMMANDS, main

runs = [["--help"]] + [[name, "--help"] for name in COMMANDS]
runs += [["route", "--no-such-option"], ["generate", "--max-new-tokens", "x"]]
for argv in runs:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "transformers", "vllm", "peft", "numpy") if m in sys.modules))
"""


def test_help_and_argument_errors_load_no_torch():
    """`dlplora --help` answers in a fraction of a second: nothing it runs imports torch (seconds)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LIGHT_START], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-400:]


def test_the_package_names_its_api_without_importing_it():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dlplora_triton as dlp; names = dir(dlp); "
            "print('torch' in sys.modules, all(n in names for n in dlp.__all__), dlp.__version__ != '')",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.stdout.split() == ["False", "True", "True"], proc.stderr
