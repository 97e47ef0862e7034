"""``dlplora serve``: vLLM's OpenAI server with routed adapter mixes and the model name ``auto``.

    dlplora serve --adapters DIR --router DIR [--p 0.8] [--top-k 3] [--auto-name auto]
                  [--tenants FILE] [--save-router DIR] [vLLM server arguments...]

This module parses the command's own options and checks ``--p`` / ``--top-k``; the arguments it does not
know go to vLLM's server. Everything vLLM-specific (the adapter and router checks, vLLM's command line,
the exec) is ``dlplora_triton.integrations.vllm.serve.serve``.
"""

from __future__ import annotations

import argparse

from ..defaults import AUTO_NAME, DEFAULT_P, SERVE_TOP_K
from ..route_options import RouteOptionError, check_route_options

__all__ = ["HELP", "DESCRIPTION", "PASSES_ON", "build_parser", "run"]

HELP = "vLLM's OpenAI server with routed adapter mixes, model 'auto' (dlplora serve --help)"
DESCRIPTION = (
    "vLLM's OpenAI server with routed adapter mixes: requests with model 'auto' are routed "
    "by the DLP-LoRA router; 'mix:a=0.7,b=0.3' and plain adapter names are served too. Arguments "
    "not listed here go to vLLM's server (e.g. --model, --port, --max-loras)."
)
PASSES_ON = True  # the arguments the parser does not know are vLLM's: run() reads them in args.passed_on

_FLAGS = {"p": "--p", "top_k": "--top-k"}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora serve", description=DESCRIPTION)
    parser.add_argument(
        "--adapters", required=True, help="directory of PEFT adapters, one sub-directory each"
    )
    parser.add_argument(
        "--router", required=True, help="a router saved by `dlplora train-router` (Router.save)"
    )
    parser.add_argument(
        "--p",
        type=float,
        default=DEFAULT_P,
        help=f"top-p of the router's adapter mix (default {DEFAULT_P})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=SERVE_TOP_K,
        help=f"at most this many adapters per request (default {SERVE_TOP_K})",
    )
    parser.add_argument(
        "--auto-name",
        default=AUTO_NAME,
        help=f"the model name that asks for routing (default {AUTO_NAME})",
    )
    parser.add_argument(
        "--tenants",
        default=None,
        metavar="FILE",
        help="JSON file of API keys, each with the adapters its requests may reach (docs/vllm.md, "
        "'Tenants'); replaces vLLM's --api-key",
    )
    parser.add_argument(
        "--save-router",
        default=None,
        metavar="DIR",
        help="save the router here after each runtime change (adapters loaded or unloaded with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); start again with --router DIR to keep them",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Check, then exec vLLM's server with ``args.passed_on`` (does not return on success)."""
    from ..integrations.vllm.serve import ServeError, serve

    try:
        check_route_options(p=args.p, top_k=args.top_k, explicit=_FLAGS)
    except RouteOptionError as err:
        raise ServeError(err.named(_FLAGS[err.field])) from None
    return serve(args, list(getattr(args, "passed_on", [])))
