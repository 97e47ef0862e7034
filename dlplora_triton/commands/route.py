"""``dlplora route``: the adapters a saved router picks for each prompt, and their weights."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_P, DEFAULT_WEIGHTING, WEIGHTINGS
from ..route_options import check_route_options

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run"]

HELP = "print the adapters a saved router picks for each prompt, and their weights"
DESCRIPTION = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora route", description=DESCRIPTION)
    parser.add_argument("--router", required=True, help="a folder written by train-router")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--p", type=float, default=DEFAULT_P, help=f"top-p cut (default {DEFAULT_P})")
    parser.add_argument("--top-k", type=int, default=None, help="keep at most K adapters per prompt")
    parser.add_argument(
        "--weighting",
        default=DEFAULT_WEIGHTING,
        choices=list(WEIGHTINGS),
        help=f"fusion weights (default {DEFAULT_WEIGHTING})",
    )
    parser.add_argument(
        "--min-confidence", type=float, default=None, help="below this top probability: the base model"
    )
    parser.add_argument(
        "--base-threshold",
        type=float,
        default=None,
        help="background probability at or above which the base model serves a prompt (default: the router's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    options = check_route_options(  # before the router is loaded; messages name the API's fields
        p=args.p,
        top_k=args.top_k,
        weighting=args.weighting,
        min_confidence=args.min_confidence,
        base_threshold=args.base_threshold,
    )
    import json

    from ..routing import Router

    router = Router.load(args.router)
    selection = router.route(
        args.prompts,
        p=options.p,
        top_k=options.top_k,
        weighting=options.weighting,
        min_confidence=options.min_confidence,
        base_threshold=options.base_threshold,
    )
    if args.json:
        # "adapters": [] is the base model; "base_proba" the router's probability that no adapter fits
        base = router.base_proba(args.prompts).tolist()
        rows = [
            {"prompt": t, "adapters": [{"name": n, "weight": w} for n, w in s], "base_proba": b}
            for t, s, b in zip(args.prompts, selection, base)
        ]
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for text, chosen in zip(args.prompts, selection):
        short = text if len(text) <= 60 else text[:57] + "..."
        mix = ", ".join(f"{name} {weight:.3f}" for name, weight in chosen) or "(base model)"
        print(f"{short!r}: {mix}")
    return 0
