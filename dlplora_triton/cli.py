"""The ``dlplora`` command: a table of subcommands, each a module of ``dlplora_triton.commands``
(``HELP``, ``DESCRIPTION``, ``build_parser``, ``run``; see that package's docstring), all run the same way."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._moved import moved_names

__all__ = ["COMMANDS", "main"]

# Subcommand -> module of dlplora_triton.commands, in the order `dlplora --help` lists them.
COMMANDS = {
    "demo": "demo",
    "compile-check": "compile_check",
    "train-router": "train_router",
    "finetune": "finetune",
    "serve": "serve",
    "route": "route",
    "generate": "generate",
    "milora-gates": "milora_gates",
    "data": "data",
}

# Bad input a command reports in one line (exit status 2) instead of a traceback.
_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError)


def _command(name: str):
    return importlib.import_module(f"dlplora_triton.commands.{COMMANDS[name]}")


def _build_parser() -> argparse.ArgumentParser:
    """``dlplora`` with every subcommand's parser (``dlplora <name>``) as a subparser."""
    parser = argparse.ArgumentParser(
        prog="dlplora", description="Dynamic fusion of many task LoRAs on one base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        command = _command(name)
        command.build_parser(sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION))
    return parser


def _message(err: Exception) -> str:
    """The error's own words: ``str(KeyError("x"))`` is ``"'x'"``, a repr in stray quotes."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, no subcommand or an unknown one: argparse answers and exits
        return 2  # not reached
    name = argv[0]
    command = _command(name)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    args, rest = sub.choices[name].parse_known_args(argv[1:], argparse.Namespace(command=name))
    if getattr(command, "PASSES_ON", False):
        args.passed_on = rest  # dlplora serve: vLLM's arguments
    elif rest:
        sub.choices[name].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return command.run(args)
    except _USER_ERRORS as err:
        print(f"dlplora {name}: error: {_message(err)}", file=sys.stderr)
        return 2


# Moved in 0.2.
__getattr__ = moved_names(
    __name__,
    {
        "DEFAULT_P": "dlplora_triton.defaults:DEFAULT_P",
    },
)


if __name__ == "__main__":
    sys.exit(main())
