"""``dlplora compile-check``: every kernel variant compiled for a GPU target, no GPU needed
(the sweep and the checks: ``dlplora_triton.compile_check``, docs/kernels.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run", "check"]

HELP = (
    "compile every kernel variant for a GPU target (no GPU needed); non-zero exit on a compile "
    "error, a spill, fp16/bf16 without tensor cores, too many decode variants or a small decode grid"
)
DESCRIPTION = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora compile-check", description=DESCRIPTION)
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    parser.add_argument("--quick", action="store_true", help="a small sweep (what `make test` runs)")
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="write the full report as JSON here (checked first)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.json is not None:
        from ..readers import check_output_file

        check_output_file(args.json, "--json")  # before minutes of compiling
    return check(args.arch, args.quick, args.json)


def check(arch: str, quick: bool, json_path: str | None) -> int:
    """Compile, print progress and the summary, write the JSON; 1 on any failure, else 0."""
    from ..compile_check import main_table, run_check

    report = run_check([a.strip() for a in arch.split(",") if a.strip()], quick)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    print(main_table(report))
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print(f"{len(report['variants'])} variants, {len(report['failures'])} failures")
    return 1 if report["failures"] else 0
