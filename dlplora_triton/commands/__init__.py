"""The ``dlplora`` subcommands, one module each (the table of names is ``dlplora_triton.cli.COMMANDS``).

Every module holds:

- ``HELP``: its line in ``dlplora --help``; ``DESCRIPTION``: the text above its options (or None);
- ``build_parser(parser=None)``: its options, added to ``parser`` (the dispatcher's subparser) or to a
  new ``dlplora <name>`` parser;
- ``run(args) -> int``: the command on parsed arguments, returning the exit status; bad input raises
  ``FileNotFoundError`` / ``ValueError`` / ``KeyError`` / ``TypeError``, which the dispatcher prints as
  one line ``dlplora <name>: error: ...`` with exit status 2;
- ``PASSES_ON = True`` where arguments the parser does not know belong to the command
  (``dlplora serve`` hands them to vLLM's server): ``run`` finds them in ``args.passed_on``.

Importing a module here is cheap (argparse and the constants of ``dlplora_triton.defaults``): torch,
transformers and vLLM are imported inside ``run``, so ``dlplora --help`` and bad arguments answer fast.
"""
