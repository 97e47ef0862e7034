"""``dlplora generate``: route each prompt to its adapter mix, then generate the whole batch at once."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_P
from ..route_options import check_route_options
from ._common import DEVICE_HELP, check_model_folder, device_of

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run"]

HELP = "route each prompt to its adapter mix and generate the whole batch at once"
DESCRIPTION = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora generate", description=DESCRIPTION)
    parser.add_argument(
        "--model", required=True, help="a local transformers causal-LM folder (model + tokenizer)"
    )
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--adapters",
        default=None,
        metavar="DIR",
        help="a folder of PEFT adapters, one sub-folder per adapter name (as dlplora serve takes); the "
        "router's adapters are loaded from it",
    )
    given.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="a PEFT adapter folder for the router's adapter NAME (repeat for each)",
    )
    parser.add_argument("--router", required=True, help="a folder written by train-router")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens to generate per prompt, at least 1 (default 32)",
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--p", type=float, default=DEFAULT_P, help=f"top-p cut of the routing (default {DEFAULT_P})"
    )
    parser.add_argument("--top-k", type=int, default=None, help="keep at most K adapters per prompt")
    parser.add_argument(
        "--min-confidence", type=float, default=None, help="below this top probability: the base model"
    )
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    # Every argument is checked before the model loads (seconds to minutes): a mistake costs one line.
    check_model_folder(args.model, "--adapter NAME=DIR or --adapters DIR")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    options = check_route_options(p=args.p, top_k=args.top_k, min_confidence=args.min_confidence)
    import json

    from ..adapters import check_adapter_dir, read_adapter_config
    from ..demo import _device
    from ..generation import generate_routed
    from ..patch import attach
    from ..routing import Router

    router = Router.load(args.router)
    adapters = _adapters(args, router)
    for name, folder in adapters.items():  # what attach reads later: the config, the weights' header
        read_adapter_config(folder, name=name)  # its errors name the adapter and the folder
        check_adapter_dir(folder, None, f"adapter {name!r} at {folder!r}")
    device = _device(device_of(args))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(device).eval()
    except OSError as err:  # transformers' "not a model folder" and friends
        raise ValueError(
            f"cannot load a model and tokenizer from {args.model!r}: {str(err).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = attach(model, adapters)
    results = generate_routed(
        model,
        lora,
        router,
        tokenizer,
        args.prompts,
        p=options.p,
        top_k=options.top_k,
        min_confidence=options.min_confidence,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
    )
    if args.json:
        print(
            json.dumps(
                [{"prompt": r.prompt, "adapters": r.adapters, "text": r.text} for r in results],
                ensure_ascii=False,
                indent=1,
            )
        )
        return 0
    for r in results:
        mix = ", ".join(f"{name} {weight:.2f}" for name, weight in r.adapters) or "base model"
        print(f"[{mix}] {r.prompt}\n  -> {r.text}")
    r = results[0]
    print(
        f"route {r.route_s * 1e3:.1f} ms, prefill {r.prefill_s * 1e3:.1f} ms, decode {r.decode_s * 1e3:.1f} ms "
        f"({len(results)} prompts in one batch, one run)"
    )
    return 0


def _adapters(args: argparse.Namespace, router) -> dict[str, str]:
    """``{adapter name: folder}`` for every adapter the router routes to; ValueError naming what is missing."""
    from pathlib import Path

    if args.adapters is not None:
        root = Path(args.adapters)
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise FileNotFoundError(
                f"--adapters {args.adapters!r} {what}; it takes a folder of PEFT adapter folders"
            )
        found = {p.name: str(p) for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}
        where = f"in --adapters {args.adapters!r} (it has {sorted(found) or 'no adapter folders'})"
    else:
        found = {}
        for spec in args.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
            if name in found:
                raise ValueError(f"--adapter {name!r} is given twice")
            found[name] = path
        where = f"among the --adapter names {sorted(found)}"
    missing = [n for n in router.names if n not in found]
    if missing:
        raise ValueError(
            f"the router at {args.router!r} routes to adapters {router.names}; {missing} not found {where}. "
            "Give an adapter for each, or train the router for the adapters you have: dlplora train-router "
            "--adapters TASK[=ADAPTER],..."
        )
    return {n: found[n] for n in router.names} if args.adapters is not None else found
