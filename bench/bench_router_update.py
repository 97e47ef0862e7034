"""Adding a task to a trained router (``Router.add_task``) against retraining it from scratch.

    python bench/bench_router_update.py [--train 10000] [--added 300] [--seed 0]
        [--text-tasks code,de,fr,ja,ru,zh,es,license,shell | all] [--out bench/results/cpu/router_update.json]

For each task T of ``--tasks`` (default es, zh, shell: each has a near neighbour among the others, fr,
ja, code), a router is trained on the first ``--train`` lines of dlplora_triton/data/router_texts.jsonl
of the ``--text-tasks`` (default the documented router's nine) less every text of T (8 tasks, each its own adapter, plus the package's general prompts as
background), then T is added from its first ``--added`` texts by ``add_task`` with each method
(``full``: the whole net, on a copy of the feature table; ``head``: the MLP, the table frozen; ``row``:
T's output row alone). The reference retrains from
scratch on the same texts (the 8 tasks' and T's ``--added``). Measured on the lines after ``--train``,
never trained on: the fraction of T's texts served by T's adapter (not the base model), of the other
8 tasks' texts served by their own adapter, and of the general prompts of
bench/data/general_prompts_dev.jsonl served by the base model, at the router's threshold (0.3); with the
seconds each took. Results in bench/results/cpu/router_update.json, the table in docs/routing.md
("Adding a task").
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import common
import torch

from dlplora_triton.routing import Router, read_labelled_jsonl

DATA, GENERAL_DEV = common.ROUTER_DATA, common.GENERAL_SETS["dev"]
METHODS = ("full", "head", "row")


def served(router: Router, texts: list[str], tasks: list[str]) -> dict:
    """Per group (the added task, the old tasks, general prompts): the fraction served as they should be."""
    top = router.predict_proba(texts).argmax(dim=1).tolist()
    base = (router.base_proba(texts) >= router.base_threshold).tolist()
    hits = {}
    for task, j, to_base in zip(tasks, top, base):
        want = router.adapter_of.get(task) if task in router.adapter_of else None
        ok = to_base if want is None else (not to_base and router.names[j] == want)
        hits.setdefault(task, []).append(ok)
    return {task: sum(flags) / len(flags) for task, flags in sorted(hits.items())}


def summary(rates: dict, added: str) -> dict:
    old = [rate for task, rate in rates.items() if task not in (added, "general")]
    return {
        "added_task": rates.get(added),
        "old_tasks_mean": sum(old) / len(old),
        "old_tasks_min": min(old),
        "general_to_base": rates.get("general"),
        "per_task": rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--added", type=int, default=300)
    parser.add_argument("--tasks", default="es,zh,shell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-tasks",
        default=common.DOCUMENTED_TASKS,
        help="the text set's tasks used, comma-separated, or 'all'",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS / "cpu" / "router_update.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts, tasks = read_labelled_jsonl(DATA, int_labels=False, owner="the text set")
    texts, tasks = common.only_tasks(texts, tasks, args.text_tasks)
    general, _ = read_labelled_jsonl(GENERAL_DEV, label_key="lang", owner="general prompts (dev)")
    train_x, train_y = texts[: args.train], tasks[: args.train]
    unseen_x = texts[args.train :] + general
    unseen_y = tasks[args.train :] + ["general"] * len(general)
    load_start = os.getloadavg()[0]
    results = []
    for added in args.tasks.split(","):
        old = [(x, t) for x, t in zip(train_x, train_y) if t != added]
        new = [x for x, t in zip(train_x, train_y) if t == added][: args.added]
        start = time.perf_counter()
        base = Router.train([x for x, _ in old], [t for _, t in old], seed=args.seed)
        base_seconds = time.perf_counter() - start
        row = {"added": added, "texts": len(new), "old_router_train_seconds": round(base_seconds, 2)}
        for method in METHODS:
            start = time.perf_counter()
            grown = base.add_task(added, new, method=method, seed=args.seed)
            seconds = time.perf_counter() - start
            row[method] = {"seconds": round(seconds, 3), **summary(served(grown, unseen_x, unseen_y), added)}
        start = time.perf_counter()
        retrained = Router.train(
            [x for x, _ in old] + new, [t for _, t in old] + [added] * len(new), seed=args.seed
        )
        seconds = time.perf_counter() - start
        row["retrain"] = {
            "seconds": round(seconds, 2),
            **summary(served(retrained, unseen_x, unseen_y), added),
        }
        row["before"] = summary(served(base, unseen_x, unseen_y), added)  # T's texts: to base is right
        results.append(row)
        for key in ("before", *METHODS, "retrain"):
            r = row[key]
            print(
                f"{added:6s} {key:8s} added {r['added_task'] if r['added_task'] is not None else float('nan'):.4f} "
                f"old mean {r['old_tasks_mean']:.4f} min {r['old_tasks_min']:.4f} "
                f"general {r['general_to_base']:.4f} {r.get('seconds', '')}",
                flush=True,
            )
    result = {
        "environment": common.environment("cpu"),
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "text_tasks": sorted(set(tasks)),
        "train_lines": args.train,
        "added_texts": args.added,
        "seed": args.seed,
        "note": "'before': the router without the task (its texts should go to the base model: the "
        "'added_task' figure is then the fraction that does); rates at the router's base_threshold 0.3",
        "results": results,
    }
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
