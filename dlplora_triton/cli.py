"""The ``dlplora`` command."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlplora", description="Dynamic fusion of many task LoRAs on one base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run fused_lora and a patched tiny model on random weights, and print what they did")
    demo.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(device=args.device, seed=args.seed)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"dlplora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
