"""The ``dlplora`` command."""

from __future__ import annotations

import argparse
import sys


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
        help="the random-weight demo, smaller router and model (what the tests run)",
    )
    check = sub.add_parser(
        "compile-check",
        help="compile every kernel variant for a GPU target (no GPU needed); non-zero exit on a compile "
        "error, a spill, fp16/bf16 without tensor cores, too many decode variants or a small decode grid",
    )
    check.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    check.add_argument("--quick", action="store_true", help="a small sweep (what `make test` runs)")
    check.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON here")
    train = sub.add_parser("train-router", help="train a sentence router on labelled prompts and save it")
    train.add_argument(
        "--data", required=True, help='JSONL file, one {"text": "...", "task": "..."} per line'
    )
    train.add_argument("--out", required=True, help="folder to save the router in (created if missing)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--epochs", type=int, default=30, help="at most this many epochs (default 30; early stopping)"
    )
    train.add_argument(
        "--adapters",
        default=None,
        metavar="TASK,...",
        help="the tasks an adapter serves (default: every task); texts of the other tasks teach the router "
        "what the base model should serve",
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
    route.add_argument("--p", type=float, default=0.6, help="top-p cut (default 0.6)")
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
    generate.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="NAME=DIR",
        help="a PEFT adapter folder for the router task NAME (repeat for each task)",
    )
    generate.add_argument("--router", required=True, help="a folder written by train-router")
    generate.add_argument("prompts", nargs="+", help="one or more prompts")
    generate.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)"
    )
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--p", type=float, default=0.6, help="top-p cut of the routing (default 0.6)")
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
    from pathlib import Path

    from .demo import _device
    from .generation import generate_routed
    from .patch import attach
    from .routing import Router

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        adapters[name] = path
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"model folder {args.model!r} does not exist")
    router = Router.load(args.router)
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
        f"({len(results)} prompts in one batch)"
    )
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
            print(f"dlplora finetune: error: {err}", file=sys.stderr)
            return 2
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(device=args.device, seed=args.seed, quick=args.quick, random=args.random)
        if args.command == "compile-check":
            from .compile_check import main as compile_check_main

            return compile_check_main(args.arch, args.quick, args.json)
        if args.command == "train-router":
            from .routing import Router, read_labelled_jsonl

            texts, tasks = read_labelled_jsonl(args.data)
            adapters = None
            if args.adapters is not None:
                adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
                unknown = sorted(set(adapters) - set(tasks))
                if unknown or not adapters:
                    raise ValueError(
                        f"--adapters names tasks not in {args.data}: {unknown or '(none given)'}; "
                        f"its tasks are {sorted(set(tasks))}"
                    )
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
            print(f"saved to {router.save(args.out)}/")
            return 0
        if args.command == "route":
            return _route(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "milora-gates":
            from .milora.show import gates_main

            return gates_main(args.model, args.milora, args.prompts, args.device, args.json)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"dlplora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
