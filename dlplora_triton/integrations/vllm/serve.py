"""What ``dlplora serve`` does once its own options are parsed (the command and its parser:
``dlplora_triton.commands.serve``): vLLM's OpenAI server with the plugin, a directory of adapters and the
DLP-LoRA router.

    dlplora serve --adapters DIR --router DIR [--p 0.8] [--top-k 3] [--auto-name auto] [vLLM server arguments...]

Checks everything it can before vLLM starts (the adapters, the router, the router's adapters against
the directory) and stops with one line naming the problem, then replaces itself with
``python -m vllm.entrypoints.openai.api_server`` (same PID), adding ``--enable-lora``, every adapter of
DIR as ``--lora-modules``, ``--max-lora-rank`` (the largest rank in DIR, unless given),
``--enforce-eager`` (CUDA graphs are not supported yet), ``--max-loras`` (``--top-k``, unless given;
at least ``--top-k``) and the routing middleware. Everything else on
the command line goes to vLLM unchanged (``--model`` first of all).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

__all__ = ["ServeError", "adapter_directories", "load_router", "serve", "vllm_command"]

MIDDLEWARE = "dlplora_triton.integrations.vllm.routed.RoutingMiddleware"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


class ServeError(ValueError):
    """A start-up problem, reported in one line before vLLM starts."""


def adapter_directories(root: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``{name: (path, rank)}`` of the PEFT adapters in ``root``; ServeError naming a bad one."""
    from dlplora_triton.adapters import check_adapter_dir
    from dlplora_triton.integrations.vllm.mixes import ADAPTER_NAME

    root = Path(root)
    if not root.is_dir():
        raise ServeError(f"--adapters {str(root)!r} is not a directory")
    found = {}
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not (path / "adapter_config.json").exists():
            continue
        if not ADAPTER_NAME.fullmatch(path.name):
            raise ServeError(
                f"--adapters: {path.name!r} is not a usable adapter name (letters, digits, '_', '.', '-')"
            )
        try:
            rank = check_adapter_dir(str(path), None, f"adapter {path.name!r}", values=True)
        except (OSError, ValueError) as e:
            raise ServeError(str(e)) from None
        found[path.name] = (str(path.resolve()), rank)
    if not found:
        raise ServeError(
            f"--adapters {str(root)!r} holds no PEFT adapter (sub-directories with adapter_config.json)"
        )
    return found


def load_router(path: str, adapters: dict) -> object:
    """The router, checked against the served adapters; ServeError when it cannot serve them."""
    from dlplora_triton.routing import Router

    try:
        router = Router.load(path)
    except (OSError, ValueError) as e:
        raise ServeError(f"--router: {e}") from None
    missing = sorted(set(router.names) - set(adapters))
    if missing:
        raise ServeError(
            f"--router routes to {missing}, which --adapters does not hold (it holds {sorted(adapters)}); "
            "retrain with `dlplora train-router --adapters ...` or map the router onto the served adapters"
        )
    return router


def _has(rest: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in rest)


def _value(rest: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``rest`` (``--flag v`` or ``--flag=v``; the last wins), or None."""
    value = None
    for i, arg in enumerate(rest):
        if arg == flag and i + 1 < len(rest):
            value = rest[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def vllm_command(args: argparse.Namespace, rest: list[str], adapters: dict) -> list[str]:
    """The argv of vLLM's server: ``rest`` plus what routed serving needs."""
    if not _has(rest, "--model") and not (rest and not rest[0].startswith("-")):
        raise ServeError("give the base model to vLLM: --model <folder or name>")
    if _has(rest, "--middleware") or _has(rest, "--lora-modules"):
        raise ServeError(
            "dlplora serve sets --middleware and --lora-modules itself (adapters come from --adapters)"
        )
    max_loras = _value(rest, "--max-loras")
    if max_loras is not None and not (max_loras.isascii() and max_loras.isdigit()):
        raise ServeError(f"--max-loras must be an integer, got {max_loras!r}")
    if max_loras is not None and int(max_loras) < args.top_k:
        raise ServeError(
            f"--max-loras {max_loras} is below --top-k {args.top_k}: a routed mix needs a slot per adapter"
        )
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *rest]
    if max_loras is None:  # vLLM's default, 1, would refuse every routed mix
        cmd += ["--max-loras", str(args.top_k)]
    if not _has(rest, "--enable-lora"):
        cmd.append("--enable-lora")
    rank = max(r for _, r in adapters.values())
    if not _has(rest, "--max-lora-rank"):
        cmd += ["--max-lora-rank", str(next(v for v in VLLM_RANKS if v >= rank))]
    if not _has(rest, "--enforce-eager"):
        cmd.append("--enforce-eager")
    cmd += ["--lora-modules", *[f"{name}={path}" for name, (path, _) in adapters.items()]]
    cmd += ["--middleware", MIDDLEWARE]
    return cmd


def serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Check the adapters, the router and ``rest`` (vLLM's arguments), then exec vLLM's server (does not
    return on success); ServeError naming the problem of a bad start-up. ``args``: the options of
    ``dlplora_triton.commands.serve.build_parser``, ``p`` and ``top_k`` already checked."""
    adapters = adapter_directories(args.adapters)
    load_router(args.router, adapters)
    cmd = vllm_command(args, rest, adapters)
    from dlplora_triton.integrations.vllm.mixes import mix_key

    mix_key()  # the key signing mixes, in this environment for every process vLLM starts
    env = dict(os.environ)
    env.update(
        DLPLORA_VLLM_ADAPTER_DIR=str(Path(args.adapters).resolve()),
        DLPLORA_ROUTER_DIR=str(Path(args.router).resolve()),
        DLPLORA_ROUTE_P=repr(args.p),
        DLPLORA_ROUTE_TOP_K=str(args.top_k),
        DLPLORA_AUTO_MODEL=args.auto_name,
    )
    print("dlplora serve: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def _serve_main(argv: list[str]) -> int:
    """The old ``serve_main(argv)``: ``dlplora serve`` with these arguments."""
    return importlib.import_module("dlplora_triton.cli").main(["serve", *argv])


def __getattr__(name: str):
    # Moved in 0.2.0 (the command lives in dlplora_triton.commands.serve); importable from here, with a
    # DeprecationWarning, until the next minor release.
    if name == "build_parser":
        warnings.warn(
            f"{__name__}.build_parser moved to dlplora_triton.commands.serve.build_parser",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("dlplora_triton.commands.serve").build_parser
    if name == "serve_main":
        warnings.warn(
            f"{__name__}.serve_main is deprecated: run dlplora_triton.cli.main(['serve', *argv])",
            DeprecationWarning,
            stacklevel=2,
        )
        return _serve_main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
