"""What ``dlplora serve`` does once its own options are parsed (the command and its parser:
``dlplora_triton.commands.serve``): vLLM's OpenAI server with the plugin, a directory of adapters and the
DLP-LoRA router.

    dlplora serve --adapters DIR --router DIR [--p 0.8] [--top-k 3] [--auto-name auto]
                  [--tenants FILE] [--save-router DIR] [vLLM server arguments...]

Checks everything it can before vLLM starts (that vLLM is installed, the base model folder, the
adapters, the router, the router's adapters against the directory) and stops with one line naming the
problem, then replaces itself with vLLM's OpenAI server (same PID; vLLM's launcher module, not the
deprecated ``vllm.entrypoints.openai.api_server``), adding ``--enable-lora``,
every adapter of DIR as ``--lora-modules``, ``--max-lora-rank`` (the largest rank in DIR, unless
given), ``--enforce-eager`` (CUDA graphs are not supported yet), ``--max-loras`` (``--top-k``, unless
given; at least ``--top-k``), ``--served-model-name`` (the model folder's name, then its path, unless
given: answers name no path of this machine) and the routing middleware. On a machine without a GPU
(vLLM's CPU build) it also picks ``--dtype float32``, ``--max-model-len 2048`` and a
``--gpu-memory-utilization`` reserving at most 4 GiB (on CPU it is a fraction of the host's memory,
and vLLM's default, 0.92, refuses to start on most machines), unless given, and says so in one line.
Everything else on the command line goes to vLLM unchanged (``--model`` first of all).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ServeError",
    "adapter_directories",
    "check_model",
    "cpu_defaults",
    "load_router",
    "serve",
    "vllm_command",
]

MIDDLEWARE = "dlplora_triton.integrations.vllm.routed.RoutingMiddleware"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
# vLLM's server entry points, newest first: the launcher vLLM's deprecation warning points to (`vllm serve`
# itself stops on vLLM's CPU build, whose distribution is not named "vllm"), then the deprecated module.
VLLM_SERVERS = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
CPU_KV_CACHE_BYTES = 4 << 30  # what the CPU defaults reserve at most (KV cache and activations)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: vLLM may download it


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


def check_tenants(path: str | None, rest: list[str]) -> str | None:
    """The tenants file's absolute path (None without ``--tenants``), read and checked; ServeError for a
    bad file, or for vLLM's own keys beside it (a request carries one key: both checks could not pass)."""
    if path is None:
        return None
    from dlplora_triton.integrations.vllm.tenants import read_tenants

    if _has(rest, "--api-key") or os.environ.get("VLLM_API_KEY"):
        raise ServeError(
            "--tenants replaces vLLM's --api-key / $VLLM_API_KEY (each request carries one key): give "
            'the operator a tenant with "adapters": "*" and "admin": true instead'
        )
    try:
        read_tenants(path)
    except (OSError, ValueError) as e:
        raise ServeError(f"--tenants: {e}") from None
    return str(Path(path).resolve())


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


def _model(rest: list[str]) -> str | None:
    """The base model vLLM is given: ``--model``, or a first positional argument."""
    model = _value(rest, "--model")
    if model is None and rest and not rest[0].startswith("-"):
        model = rest[0]
    return model


def server_module() -> str:
    """The module of vLLM's OpenAI server to run (found in vLLM's files, without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    root = Path(spec.origin).parent if spec is not None and spec.origin else None
    for module in VLLM_SERVERS:
        if root is not None and (root.parent / (module.replace(".", "/") + ".py")).is_file():
            return module
    return VLLM_SERVERS[-1]


def check_vllm_installed() -> None:
    """ServeError when vLLM cannot be imported here (found without importing it: that takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(
            "dlplora serve runs vLLM's server, and vLLM is not installed in this Python: pip install vllm "
            "(GPU), or vLLM's CPU build (docs/vllm.md, 'Install')"
        )


def check_model(model: str | None) -> None:
    """ServeError unless ``model`` is a transformers model folder or looks like a hub id (org/name)."""
    if model is None:
        raise ServeError("give the base model to vLLM: --model <folder or name>")
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            try:
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            hint = f" (its base model: {base})" if base else ""
            raise ServeError(
                f"--model {model!r} is a LoRA adapter folder; give its base model{hint} to --model and put "
                "adapters in --adapters"
            )
        if not (path / "config.json").is_file():
            raise ServeError(
                f"--model {model!r} is a folder without config.json: give a transformers model folder"
            )
    elif path.exists():
        raise ServeError(f"--model {model!r} is a file: give a transformers model folder or a hub name")
    elif model.startswith(("/", ".", "~")) or not (HUB_ID.fullmatch(model) or "/" not in model):
        raise ServeError(f"--model {model!r} does not exist: give a transformers model folder or a hub name")


def _on_cpu() -> bool:
    """Whether vLLM will run on the CPU: no CUDA (or ROCm) device and no XPU in this PyTorch."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def _memory_bytes() -> tuple[int, int]:
    """``(total, available)`` bytes of host memory (Linux's /proc/meminfo; else the page count twice)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.split()[1:]}
        return info.get("MemTotal", total), info.get("MemAvailable", total)
    except (OSError, ValueError, IndexError):
        return total, total


def cpu_defaults(rest: list[str], memory: tuple[int, int] | None = None) -> list[str]:
    """The flags ``dlplora serve`` adds for vLLM's CPU build, those of ``rest`` left alone."""
    total, available = memory or _memory_bytes()
    reserve = min(CPU_KV_CACHE_BYTES, available // 2)
    fraction = max(0.01, int(100 * reserve / total) / 100)  # rounded down: never more than `reserve`
    chosen = {
        "--dtype": "float32",  # any x86 CPU; bf16 needs AVX512-BF16 or AMX, and fp32 is PEFT-exact
        "--max-model-len": "2048",
        "--gpu-memory-utilization": f"{fraction:g}",
    }
    return [item for flag, value in chosen.items() if not _has(rest, flag) for item in (flag, value)]


def _api_server_flags(rest: list[str]) -> list[str]:
    """``--api-server-count 1`` when runtime adapter updates are on and vLLM would start several API
    servers (``--data-parallel-size`` above 1 defaults to one per rank); ServeError when ``rest`` asks
    for several. Each API server process routes with its own router, and a load or unload through one
    changes that one's only: the others would route to an adapter that left, or never to a new one."""
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() not in ("1", "true"):
        return []  # vLLM's own reading of the variable (vllm.envs would import vLLM: seconds)
    count = _value(rest, "--api-server-count") or _value(rest, "-asc")
    if count is not None:
        if not (count.isascii() and count.isdigit()) or int(count) > 1:
            raise ServeError(
                f"--api-server-count {count} with VLLM_ALLOW_RUNTIME_LORA_UPDATING: each API server "
                "process routes with its own router, and an adapter loaded or unloaded through one "
                "would change that one's only; runtime updates need one API server (leave the flag out)"
            )
        return []
    ranks = _value(rest, "--data-parallel-size") or _value(rest, "-dp")
    if ranks is not None and ranks.isascii() and ranks.isdigit() and int(ranks) > 1:
        return ["--api-server-count", "1"]
    return []


def vllm_command(
    args: argparse.Namespace, rest: list[str], adapters: dict, cpu_flags: Sequence[str] = ()
) -> list[str]:
    """The argv of vLLM's server: ``rest`` plus what routed serving needs, and ``cpu_flags`` (the CPU
    defaults of :func:`cpu_defaults`, on a machine without a GPU)."""
    model = _model(rest)
    check_model(model)
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
    cmd = [sys.executable, "-m", server_module(), *rest, *_api_server_flags(rest)]
    if max_loras is None:  # vLLM's default, 1, would refuse every routed mix
        cmd += ["--max-loras", str(args.top_k)]
    if not _has(rest, "--enable-lora"):
        cmd.append("--enable-lora")
    rank = max(r for _, r in adapters.values())
    if not _has(rest, "--max-lora-rank"):
        cmd += ["--max-lora-rank", str(next(v for v in VLLM_RANKS if v >= rank))]
    if not _has(rest, "--enforce-eager"):
        cmd.append("--enforce-eager")
    if not _has(rest, "--served-model-name"):
        # vLLM answers with the first name; the path stays a name clients may send.
        short = Path(model).name or model
        cmd += ["--served-model-name", *dict.fromkeys([short, model])]
    cmd += cpu_flags
    cmd += ["--lora-modules", *[f"{name}={path}" for name, (path, _) in adapters.items()]]
    cmd += ["--middleware", MIDDLEWARE]
    return cmd


def serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Check the adapters, the router and ``rest`` (vLLM's arguments), then exec vLLM's server (does not
    return on success); ServeError naming the problem of a bad start-up. ``args``: the options of
    ``dlplora_triton.commands.serve.build_parser``, ``p`` and ``top_k`` already checked."""
    check_vllm_installed()
    check_model(_model(rest))  # before the adapters and the router: the first mistake, named first
    adapters = adapter_directories(args.adapters)
    load_router(args.router, adapters)
    tenants = check_tenants(getattr(args, "tenants", None), rest)
    save_router = getattr(args, "save_router", None)
    if save_router is not None:
        from dlplora_triton.readers import check_output_dir

        try:
            save_router = str(check_output_dir(save_router, "--save-router").resolve())
        except ValueError as e:
            raise ServeError(str(e)) from None
    cpu_flags = cpu_defaults(rest) if _on_cpu() else []  # reads the host's memory once
    cmd = vllm_command(args, rest, adapters, cpu_flags)
    if cpu_flags:
        print(
            "dlplora serve: no GPU here (vLLM's CPU build): "
            + " ".join(cpu_flags)
            + " (give these flags to choose others)",
            file=sys.stderr,
            flush=True,
        )
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
    for name, value in (("DLPLORA_TENANTS_FILE", tenants), ("DLPLORA_ROUTER_SAVE_DIR", save_router)):
        if value is not None:
            env[name] = value
        else:  # not inherited from the caller's environment: only what this command line says
            env.pop(name, None)
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
