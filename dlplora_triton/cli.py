"""The ``dlplora`` command."""

from __future__ import annotations

import argparse
import sys

# The package's one default top-p (routing/select.py says why 0.8); a plain constant here: importing
# routing (torch) before parsing would slow every `dlplora --help`.
DEFAULT_P = 0.8


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlplora", description="Dynamic fusion of many task LoRAs on one base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="route prompts of several tasks to SmolLM2-135M's task adapters, generate, check against PEFT "
        "(--random: fused_lora and a tiny model on random weights)",
    )
    demo.add_argument(
        "--random", action="store_true", help="the random-weight demo (no model wheel needed; seconds)"
    )
    demo.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if present)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="the small form (what the tests run): SmolLM2 with 8 new tokens and no timings; with --random, "
        "a smaller router and model",
    )
    check = sub.add_parser(
        "compile-check",
        help="compile every kernel variant for a GPU target (no GPU needed); non-zero exit on a compile "
        "error, a spill, fp16/bf16 without tensor cores, too many decode variants or a small decode grid",
    )
    check.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    check.add_argument("--quick", action="store_true", help="a small sweep (what `make test` runs)")
    check.add_argument(
        "--json", default=None, metavar="PATH", help="write the full report as JSON here (checked first)"
    )
    train = sub.add_parser("train-router", help="train a sentence router on labelled prompts and save it")
    train.add_argument(
        "--data", required=True, help='JSONL file, one {"text": "...", "task": "..."} per line'
    )
    train.add_argument(
        "--out",
        required=True,
        help="folder to save the router in (created if missing; checked before training)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--epochs", type=int, default=30, help="at most this many epochs (default 30; early stopping)"
    )
    train.add_argument(
        "--tasks",
        default=None,
        metavar="TASK,...",
        help="train on these tasks' texts only (default: every task in --data)",
    )
    train.add_argument(
        "--adapters",
        default=None,
        metavar="TASK[=ADAPTER],...",
        help="the tasks an adapter serves, each under its own name or mapped onto an adapter's (de=german; "
        "several tasks may map to one adapter); default: every task; texts of the other tasks teach the "
        "router what the base model should serve. The router then routes to these adapter names, which "
        "dlplora generate and dlplora serve must have",
    )
    train.add_argument(
        "--no-general",
        action="store_true",
        help="do not add the package's general chat prompts as background (then only tasks left out of "
        "--adapters are background)",
    )
    train.add_argument(
        "--base-threshold",
        type=float,
        default=0.3,
        help="background probability at or above which the base model serves a prompt (default 0.3; saved)",
    )
    # finetune keeps its own parser (dlplora_triton.finetune.finetune_main); listed here for --help.
    sub.add_parser(
        "finetune",
        add_help=False,
        help="dynamic-rank LoRA fine-tuning of a classifier from JSONL (dlplora finetune --help)",
    )
    # serve keeps its own parser (dlplora_triton.integrations.vllm.serve): the rest goes to vLLM.
    sub.add_parser(
        "serve",
        add_help=False,
        help="vLLM's OpenAI server with routed adapter mixes, model 'auto' (dlplora serve --help)",
    )
    route = sub.add_parser(
        "route", help="print the adapters a saved router picks for each prompt, and their weights"
    )
    route.add_argument("--router", required=True, help="a folder written by train-router")
    route.add_argument("prompts", nargs="+", help="one or more prompts")
    route.add_argument("--p", type=float, default=DEFAULT_P, help=f"top-p cut (default {DEFAULT_P})")
    route.add_argument("--top-k", type=int, default=None, help="keep at most K adapters per prompt")
    route.add_argument(
        "--weighting", default="renorm", choices=["renorm", "softmax"], help="fusion weights (default renorm)"
    )
    route.add_argument(
        "--min-confidence", type=float, default=None, help="below this top probability: the base model"
    )
    route.add_argument(
        "--base-threshold",
        type=float,
        default=None,
        help="background probability at or above which the base model serves a prompt (default: the router's)",
    )
    route.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    generate = sub.add_parser(
        "generate", help="route each prompt to its adapter mix and generate the whole batch at once"
    )
    generate.add_argument(
        "--model", required=True, help="a local transformers causal-LM folder (model + tokenizer)"
    )
    given = generate.add_mutually_exclusive_group(required=True)
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
    generate.add_argument("--router", required=True, help="a folder written by train-router")
    generate.add_argument("prompts", nargs="+", help="one or more prompts")
    generate.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)"
    )
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument(
        "--p", type=float, default=DEFAULT_P, help=f"top-p cut of the routing (default {DEFAULT_P})"
    )
    generate.add_argument("--top-k", type=int, default=None, help="keep at most K adapters per prompt")
    generate.add_argument(
        "--min-confidence", type=float, default=None, help="below this top probability: the base model"
    )
    generate.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if present)"
    )
    generate.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    gates = sub.add_parser(
        "milora-gates", help="print the LoRA modules a saved MiLoRA picks in each layer for each prompt"
    )
    gates.add_argument(
        "--model", required=True, help="a local transformers causal-LM folder (model + tokenizer)"
    )
    gates.add_argument("--milora", required=True, help="a folder written by MiLoRA.save")
    gates.add_argument("prompts", nargs="+", help="one or more prompts")
    gates.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if present)"
    )
    gates.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _generate(args) -> int:
    import json

    from .demo import _device
    from .generation import generate_routed
    from .patch import attach
    from .routing import Router

    _check_model_folder(args.model, "--adapter NAME=DIR or --adapters DIR")
    router = Router.load(args.router)
    adapters = _generate_adapters(args, router)
    device = _device(args.device)
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
        p=args.p,
        top_k=args.top_k,
        min_confidence=args.min_confidence,
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


def _generate_adapters(args, router) -> dict[str, str]:
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


def _check_model_folder(path: str, adapters_flag: str) -> None:
    """``--model`` must be a transformers model folder; a clear error for an adapter folder or a file."""
    from pathlib import Path

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--model {path!r} does not exist")
    if not folder.is_dir():
        raise ValueError(
            f"--model {path!r} is a file; it takes a transformers model folder (config.json, weights, tokenizer)"
        )
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        what = "a MiLoRA folder" if (folder / "milora_config.json").is_file() else "a PEFT adapter folder"
        raise ValueError(
            f"--model {path!r} is {what}, not a model: --model takes the base model's folder (config.json, "
            f"weights, tokenizer) and the adapter goes to {adapters_flag}"
        )
    raise ValueError(f"--model {path!r} has no config.json: it is not a transformers model folder")


def _check_milora_folder(path: str) -> None:
    from pathlib import Path

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--milora {path!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"--milora {path!r} is a file; it takes a folder written by MiLoRA.save")
    if (folder / "milora_config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"--milora {path!r} is a plain PEFT LoRA adapter (no milora_config.json), which has no per-layer "
            "gates; milora-gates reads a folder written by MiLoRA.save (serve a plain adapter with dlplora "
            "generate --adapter NAME=DIR)"
        )
    raise ValueError(
        f"--milora {path!r} has no milora_config.json: it is not a folder written by MiLoRA.save"
    )


def _split_names(value: str, flag: str) -> list[str]:
    names = [a.strip() for a in value.split(",") if a.strip()]
    if not names:
        raise ValueError(f"{flag} names no task")
    return names


def _train_router(args) -> int:
    from .readers import check_output_dir
    from .routing import Router, read_labelled_jsonl

    out = check_output_dir(args.out, "--out")  # before the data is read or anything trains
    texts, tasks = read_labelled_jsonl(args.data, int_labels=False, owner="--data")
    known = sorted(set(tasks))
    if args.tasks is not None:
        keep = _split_names(args.tasks, "--tasks")
        unknown = sorted(set(keep) - set(known))
        if unknown:
            raise ValueError(f"--tasks names tasks not in {args.data}: {unknown}; its tasks are {known}")
        texts, tasks = map(list, zip(*[(x, t) for x, t in zip(texts, tasks) if t in keep]))
        known = sorted(set(tasks))
    adapters = None
    if args.adapters is not None:
        adapters = {}
        for item in _split_names(args.adapters, "--adapters"):
            task, _, name = item.partition("=")
            task, name = task.strip(), (name.strip() if "=" in item else task.strip())
            if not task or not name:
                raise ValueError(f"--adapters takes TASK or TASK=ADAPTER items, got {item!r}")
            adapters[task] = name
        unknown = sorted(set(adapters) - set(known))
        if unknown:
            raise ValueError(f"--adapters names tasks not in {args.data}: {unknown}; its tasks are {known}")
    router = Router.train(  # bar + report
        texts,
        tasks,
        adapters=adapters,
        background=None if args.no_general else "builtin",
        base_threshold=args.base_threshold,
        seed=args.seed,
        epochs=args.epochs,
        verbose=True,
    )
    print(f"saved to {router.save(out)}/; it routes to the adapters {router.names}")
    return 0


def _route(args) -> int:
    import json

    from .routing import Router

    router = Router.load(args.router)
    selection = router.route(
        args.prompts,
        p=args.p,
        top_k=args.top_k,
        weighting=args.weighting,
        min_confidence=args.min_confidence,
        base_threshold=args.base_threshold,
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


def _message(err: Exception) -> str:
    """The error's own words: ``str(KeyError("x"))`` is ``"'x'"``, a repr in stray quotes."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # its unknown arguments go to vLLM's server
        from .integrations.vllm.serve import serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["finetune"]:
        from .finetune import finetune_main

        try:
            return finetune_main(argv[1:])
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            print(f"dlplora finetune: error: {_message(err)}", file=sys.stderr)
            return 2
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(device=args.device, seed=args.seed, quick=args.quick, random=args.random)
        if args.command == "compile-check":
            from .compile_check import main as compile_check_main

            if args.json is not None:
                from .readers import check_output_file

                check_output_file(args.json, "--json")  # before minutes of compiling
            return compile_check_main(args.arch, args.quick, args.json)
        if args.command == "train-router":
            return _train_router(args)
        if args.command == "route":
            return _route(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "milora-gates":
            from .milora.show import gates_main

            _check_model_folder(args.model, "--milora")
            _check_milora_folder(args.milora)
            return gates_main(args.model, args.milora, args.prompts, args.device, args.json)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"dlplora {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
