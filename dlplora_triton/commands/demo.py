"""``dlplora demo``: SmolLM2-135M's task adapters routed and checked against PEFT, or ``--random`` weights."""

from __future__ import annotations

import argparse

from ._common import DEVICE_HELP, device_of

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run"]

HELP = (
    "route prompts of several tasks to SmolLM2-135M's task adapters, generate, check against PEFT "
    "(--random: fused_lora and a tiny model on random weights)"
)
DESCRIPTION = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora demo", description=DESCRIPTION)
    parser.add_argument(
        "--random",
        action="store_true",
        help="the random-weight demo: a tiny Llama built from a config, checked against PEFT (no model wheel; "
        "needs peft, the one extra: pip install peft; seconds)",
    )
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small form (what the tests run), with no timings: SmolLM2 with 8 new tokens; with --random, "
        "a smaller router and model. Without --quick, timings come with the load average, and none when the "
        "1-minute load is above the core count",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """0 when every output matched its oracle, 1 on a mismatch, 2 when a dependency is missing."""
    from ..demo import run_demo

    return run_demo(device=device_of(args), seed=args.seed, quick=args.quick, random=args.random)
