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
    train = sub.add_parser("train-router", help="train a sentence router on labelled prompts and save it")
    train.add_argument("--data", required=True, help='JSONL file, one {"text": "...", "task": "..."} per line')
    train.add_argument("--out", required=True, help="folder to save the router in (created if missing)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--epochs", type=int, default=30, help="at most this many epochs (default 30; early stopping)")
    # finetune keeps its own parser (dlplora_triton.dynamic.finetune_main); listed here for --help.
    sub.add_parser("finetune", add_help=False, help="dynamic-rank LoRA fine-tuning of a classifier from JSONL (dlplora finetune --help)")
    route = sub.add_parser("route", help="print the adapters a saved router picks for each prompt, and their weights")
    route.add_argument("--router", required=True, help="a folder written by train-router")
    route.add_argument("prompts", nargs="+", help="one or more prompts")
    route.add_argument("--p", type=float, default=0.6, help="top-p cut (default 0.6)")
    route.add_argument("--top-k", type=int, default=None, help="keep at most K adapters per prompt")
    route.add_argument("--weighting", default="renorm", choices=["renorm", "softmax"], help="fusion weights (default renorm)")
    route.add_argument("--min-confidence", type=float, default=None, help="below this top probability: the base model")
    route.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _route(args) -> int:
    import json

    from .router import Router

    router = Router.load(args.router)
    selection = router.route(
        args.prompts, p=args.p, top_k=args.top_k, weighting=args.weighting, min_confidence=args.min_confidence
    )
    if args.json:
        rows = [{"prompt": t, "adapters": [{"name": n, "weight": w} for n, w in s]} for t, s in zip(args.prompts, selection)]
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for text, chosen in zip(args.prompts, selection):
        short = text if len(text) <= 60 else text[:57] + "..."
        mix = ", ".join(f"{name} {weight:.3f}" for name, weight in chosen) or "(base model)"
        print(f"{short!r}: {mix}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune"]:
        from .dynamic import finetune_main

        try:
            return finetune_main(argv[1:])
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            print(f"dlplora finetune: error: {err}", file=sys.stderr)
            return 2
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
        if args.command == "train-router":
            from .router import Router, read_labelled_jsonl

            texts, tasks = read_labelled_jsonl(args.data)
            router = Router.train(texts, tasks, seed=args.seed, epochs=args.epochs, verbose=True)  # bar + report
            print(f"saved to {router.save(args.out)}/")
            return 0
        if args.command == "route":
            return _route(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"dlplora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
