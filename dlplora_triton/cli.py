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
    demo.add_argument("--quick", action="store_true", help="a smaller router and model (seconds, not minutes)")
    bench = sub.add_parser("bench", help="time one adapted layer: ours against the baselines, with the roofline floor")
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if present)")
    bench.add_argument("--quick", action="store_true", help="a few points per sweep")
    bench.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
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

            return run_demo(device=args.device, seed=args.seed, quick=args.quick)
        if args.command == "bench":
            from pathlib import Path

            from .benchmark import run
            from .demo import _device

            device = str(_device(args.device))
            if device == "cpu":
                import torch

                torch.set_num_threads(min(2, torch.get_num_threads()))
            run(device, args.quick, Path(args.out) if args.out else None)
            return 0
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"dlplora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
