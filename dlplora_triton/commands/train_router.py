"""``dlplora train-router``: train a sentence router on labelled prompts (JSONL) and save it."""

from __future__ import annotations

import argparse

from ..defaults import BASE_THRESHOLD, MIN_TEXTS_PER_TASK

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run"]

HELP = "train a sentence router on labelled prompts and save it"
DESCRIPTION = (
    f"Train a sentence router on labelled prompts and save it. Give every task at least {MIN_TEXTS_PER_TASK} "
    "texts: with fewer, the routers measured sent general prompts to adapters or adapter tasks' texts to "
    "the base model (docs/routing.md, 'How much data'). A router trained on fewer, or with a poor held-out "
    "accuracy or abstention, is saved with a warning on stderr and in its report."
)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora train-router", description=DESCRIPTION)
    parser.add_argument(
        "--data",
        default=None,
        help='JSONL file, one {"text": "...", "task": "..."} per line; at least '
        f"{MIN_TEXTS_PER_TASK} texts per task",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder to save the router in (created if missing; checked before training)",
    )
    parser.add_argument(
        "--router",
        default=None,
        metavar="DIR",
        help="with --add: the saved router to extend (instead of training one on --data)",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=None,
        metavar="TASK=FILE",
        help="add task TASK, served by the adapter of that name, to --router from the texts of FILE "
        '(JSONL, {"text": ...} per line; lines of other tasks skipped) in seconds, without retraining '
        "(Router.add_task; repeat for several tasks). What a server does when an adapter is loaded at "
        "runtime with examples",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--epochs", type=int, default=30, help="at most this many epochs (default 30; early stopping)"
    )
    parser.add_argument(
        "--tasks",
        default=None,
        metavar="TASK,...",
        help="train on these tasks' texts only (default: every task in --data)",
    )
    parser.add_argument(
        "--adapters",
        default=None,
        metavar="TASK[=ADAPTER],...",
        help="the tasks an adapter serves, each under its own name or mapped onto an adapter's (de=german; "
        "several tasks may map to one adapter); default: every task; texts of the other tasks teach the "
        "router what the base model should serve. The router then routes to these adapter names, which "
        "dlplora generate and dlplora serve must have",
    )
    parser.add_argument(
        "--no-general",
        action="store_true",
        help="do not add the package's general chat prompts as background (then only tasks left out of "
        "--adapters are background)",
    )
    parser.add_argument(
        "--base-threshold",
        type=float,
        default=BASE_THRESHOLD,
        help="background probability at or above which the base model serves a prompt "
        f"(default {BASE_THRESHOLD}; saved)",
    )
    return parser


def _split_names(value: str, flag: str) -> list[str]:
    names = [a.strip() for a in value.split(",") if a.strip()]
    if not names:
        raise ValueError(f"{flag} names no task")
    return names


def _add(args: argparse.Namespace, out) -> int:
    """``--router DIR --add TASK=FILE ...``: the saved router with the tasks added, saved to ``out``."""
    from ..routing import Router
    from ..routing.update import read_examples

    if args.router is None or args.data is not None:
        raise ValueError("--add extends a saved router: give --router DIR (and no --data)")
    additions = []
    for item in args.add:
        task, sep, path = item.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise ValueError(f"--add takes TASK=FILE, got {item!r}")
        additions.append((task.strip(), path.strip()))
    router = Router.load(args.router)
    for task, path in additions:
        texts = read_examples(path, task, f"--add {task}={path}")
        router = router.add_task(task, texts, seed=args.seed)
        entry = router.report["updates"][-1]
        print(
            f"added {task!r} from {entry['texts']} texts in {entry['seconds']:.2f} s ({entry['method']}; "
            f"{entry['own_texts_top']:.1%} of them score it highest)"
        )
        for warning in entry["warnings"]:
            import sys

            print(f"dlplora train-router: warning: {warning}", file=sys.stderr)
    print(f"saved to {router.save(out)}/; it routes to the adapters {router.names}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..readers import check_output_dir
    from ..routing import Router, read_labelled_jsonl

    out = check_output_dir(args.out, "--out")  # before the data is read or anything trains
    if args.add:
        return _add(args, out)
    if args.data is None:
        raise ValueError("give --data (labelled texts to train on), or --router DIR --add TASK=FILE")
    if args.router is not None:
        raise ValueError("--router is read with --add only (to extend a saved router)")
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
    import sys

    from ..routing.train import format_warnings

    warning = format_warnings(router.report)
    if warning is not None:  # saved all the same (the report keeps it): the caller decides
        print(f"dlplora train-router: warning: {warning}", file=sys.stderr)
    print(f"saved to {router.save(out)}/; it routes to the adapters {router.names}")
    return 0
