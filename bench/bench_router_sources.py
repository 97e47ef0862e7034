"""Does the router generalise to sources it never saw? Whole sources held out of training.

    python bench/bench_router_sources.py [--folds 2] [--seed 0] [--out bench/results/cpu/router_sources.json]
        [--train-tasks code,de,fr,ja,ru,zh,es,license,shell | all]

Every line of dlplora_triton/data/router_texts.jsonl names its source (``"source"``: a man page, a
gettext catalogue, a code file; bench/data/build_router_data.py). A *source group* is one man page
(all sections), one catalogue (program messages of one package, e.g. ``mo:coreutils``), one Python
top-level package or module (``dist-packages:requests``, ``stdlib:asyncio``), or one file of the other
kinds (a C header, a Perl module, a licence file, ...). Each task's source groups are dealt into 4
folds by a BLAKE2b hash of (task, group); for fold f (f < ``--folds``) every text of the groups in
fold f is held out, and a router is trained the documented way (``dlplora train-router --tasks
code,de,fr,ja,ru,zh,es,license,shell --adapters code,de,fr,ja,ru,zh``: ``Router.train`` at its
defaults, the package's general prompts as background, the six tasks served by the six SmolLM2
adapters, es / license / shell background; ``--train-tasks all``: every task, the other 28 background)
on the texts of the other groups. Then, on the held-out groups (every task's, trained on or not):

* on-task: texts of the six adapters' tasks served by their own adapter (target >= 99%), also per
  kind (man pages, program messages, standard library, other Python packages);
* off-task: texts of the tasks without an adapter served by the base model (target >= 95%);
* general chat prompts never trained on (bench/data/general_prompts_{dev,test}.jsonl) served by the
  base model (target >= 95%).

Reference (the whole kind held out, the issue's case): a router that sees only the first version's
sources of the six tasks (their man pages, the standard library) and is tested on their program
messages and on Python code from other packages (the other tasks' texts all seen).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter, defaultdict
from pathlib import Path

import common

from dlplora_triton.routing import Router, read_labelled_jsonl

HERE = Path(__file__).resolve().parent
DATA, GENERAL_SETS = common.ROUTER_DATA, common.GENERAL_SETS
ADAPTERS = common.ADAPTER_TASKS
NUM_FOLDS = 4
THRESHOLDS = (0.3, 0.5, 0.6, 0.7)
FIRST_KINDS = ("man", "stdlib", "license")  # the first version's sources (the adapters' training data)


def source_group(source: str) -> str:
    """The unit held out: a man page (its section dropped), a catalogue, a Python top-level package
    or module, or a file."""
    kind, _, rest = source.partition(":")
    if kind in ("imports", "headers"):  # <kind>:<tree>/<file>: with the statements of its package
        kind, _, rest = rest.partition("/")
    if kind == "man":
        return "man:" + rest.rsplit(".", 1)[0]
    if kind in ("stdlib", "dist-packages"):
        return f"{kind}:{rest.split('/')[0].removesuffix('.py')}"
    return source


def fold_of(task: str, group: str) -> int:
    return hashlib.blake2b(f"{task}\t{group}".encode(), digest_size=8).digest()[0] % NUM_FOLDS


def _rate(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def measure(router: Router, texts, tasks, sources, general, threshold: float) -> dict:
    """On-task (to their adapter), off-task (to the base model) and general-prompt figures at one
    base threshold."""
    routes = router.route(texts, base_threshold=threshold) if texts else []
    on = defaultdict(list)
    off = defaultdict(list)
    on_kind = defaultdict(list)
    missed = Counter()
    for task, source, route in zip(tasks, sources, routes):
        if task in ADAPTERS:
            hit = bool(route) and route[0][0] == task
            on[task].append(hit)
            on_kind[source.partition(":")[0]].append(hit)
            if not hit:
                missed[f"{task} -> {route[0][0] if route else 'base'}"] += 1
        else:
            off[task].append(route == [])
            if route:
                missed[f"{task} -> {route[0][0]}"] += 1
    out = {
        "on_task_to_adapter": _rate(h for v in on.values() for h in v),
        "on_task_texts": sum(len(v) for v in on.values()),
        "off_task_to_base": _rate(h for v in off.values() for h in v),
        "off_task_texts": sum(len(v) for v in off.values()),
        "on_task_per_task": {t: _rate(v) for t, v in sorted(on.items())},
        "on_task_per_kind": {k: _rate(v) for k, v in sorted(on_kind.items())},
        "on_task_per_kind_texts": {k: len(v) for k, v in sorted(on_kind.items())},
        "off_task_per_task": {t: _rate(v) for t, v in sorted(off.items())},
        "missed": dict(missed.most_common(12)),
    }
    for name, prompts in general.items():
        out[f"general_{name}_to_base"] = _rate(
            r == [] for r in router.route(prompts, base_threshold=threshold)
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--folds", type=int, default=2, help=f"folds measured, of {NUM_FOLDS} (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "cpu" / "router_sources.json")
    parser.add_argument(
        "--train-tasks", default=common.DOCUMENTED_TASKS, help="tasks trained on, comma-separated, or 'all'"
    )
    args = parser.parse_args(argv)

    texts, tasks = read_labelled_jsonl(args.data)
    _, sources = read_labelled_jsonl(args.data, label_key="source")
    groups = [source_group(s) for s in sources]
    folds = [fold_of(t, g) for t, g in zip(tasks, groups)]
    trained = set(tasks) if args.train_tasks == "all" else set(args.train_tasks.split(","))
    general = {name: read_labelled_jsonl(path, label_key="lang")[0] for name, path in GENERAL_SETS.items()}

    def run(train_rows, test_rows) -> dict:
        start = time.perf_counter()
        router = Router.train(
            [texts[i] for i in train_rows], [tasks[i] for i in train_rows], adapters=ADAPTERS, seed=args.seed
        )
        seconds = time.perf_counter() - start
        by_threshold = {
            str(threshold): measure(
                router,
                [texts[i] for i in test_rows],
                [tasks[i] for i in test_rows],
                [sources[i] for i in test_rows],
                general,
                threshold,
            )
            for threshold in THRESHOLDS
        }
        result = dict(by_threshold[str(router.base_threshold)])
        result["by_threshold"] = {
            t: {k: v for k, v in row.items() if k.endswith("_to_base") or k == "on_task_to_adapter"}
            for t, row in by_threshold.items()
        }
        result.update(train_texts=len(train_rows), train_seconds=round(seconds, 1))
        result["heldout_accuracy_of_its_split"] = router.report["heldout_accuracy"]
        return result

    results = {"environment": common.environment("cpu"), "train_tasks": sorted(trained), "folds": {}}
    for fold in range(args.folds):
        held = [i for i, f in enumerate(folds) if f == fold]
        train = [i for i, f in enumerate(folds) if f != fold and tasks[i] in trained]
        held_groups = defaultdict(set)
        seen_groups = defaultdict(set)
        for i in range(len(texts)):
            (held_groups if folds[i] == fold else seen_groups)[tasks[i]].add(groups[i])
        result = run(train, held)
        result["groups"] = {
            t: {
                "seen": len(seen_groups[t]),
                "held_out": len(held_groups[t]),
                "held_out_names": sorted(held_groups[t]),
            }
            for t in sorted(set(tasks))
        }
        results["folds"][str(fold)] = result
        print(
            f"fold {fold}: on-task unseen-source texts to their adapter {result['on_task_to_adapter']:.4f} "
            f"({result['on_task_texts']}; per kind {result['on_task_per_kind']}), off-task to base "
            f"{result['off_task_to_base']:.4f} ({result['off_task_texts']}), general dev "
            f"{result['general_dev_to_base']:.4f} / test {result['general_test_to_base']:.4f}; "
            f"trained on {result['train_texts']} in {result['train_seconds']} s; missed {result['missed']}"
        )
        print(f"  by base threshold: {result['by_threshold']}")

    # Reference: the six tasks' new kinds of source held out entirely.
    new_kind = [
        tasks[i] in ADAPTERS and sources[i].partition(":")[0] not in FIRST_KINDS for i in range(len(texts))
    ]
    reference = run(
        [i for i in range(len(texts)) if not new_kind[i] and tasks[i] in trained],
        [i for i in range(len(texts)) if new_kind[i]],
    )
    results["kind_held_out_reference"] = reference
    print(
        f"reference, six tasks trained on their man pages / standard library only: their program messages "
        f"and other Python to their adapter {reference['on_task_to_adapter']:.4f} "
        f"({reference['on_task_per_task']}); missed {reference['missed']}"
    )

    on = [results["folds"][f]["on_task_to_adapter"] for f in results["folds"]]
    off = [results["folds"][f]["off_task_to_base"] for f in results["folds"]]
    general_rates = [
        results["folds"][f][f"general_{n}_to_base"] for f in results["folds"] for n in GENERAL_SETS
    ]
    results["goals"] = {
        "on_task_unseen_sources_to_adapter >= 0.99 (every fold)": min(on) >= 0.99,
        "off_task_unseen_sources_to_base >= 0.95 (every fold)": min(off) >= 0.95,
        "general_to_base >= 0.95 (every fold, dev and test)": min(general_rates) >= 0.95,
    }
    results["data"] = {
        "file": str(
            args.data.relative_to(HERE.parent) if args.data.is_relative_to(HERE.parent) else args.data
        ),
        "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "lines": len(texts),
        "folds": NUM_FOLDS,
        "seed": args.seed,
    }
    print(results["goals"])
    common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
