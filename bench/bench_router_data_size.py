"""How much data the sentence router needs: accuracy and abstention against texts per task.

    python bench/bench_router_data_size.py [--sizes 12,25,50,100,200] [--seeds 0]

For each set of tasks and size N, ``dlplora train-router``'s default training (the package's 835
general prompts as background, ``Router.train``'s defaults) on the first N texts of each task among the
first 10,000 lines of the first version of dlplora_triton/data/router_texts.jsonl (its 9 tasks:
``demo.tasks.load_texts``). The task sets: 2 tasks (de, code), the
README's 6 adapters' tasks (code, de, fr, ja, ru, zh), and all 9 tasks served by those 6 adapters (es,
license and shell become background). Fewer tasks means the general prompts outnumber the tasks' texts
by more. Reported per task set, size and seed: the training report's
held-out accuracy and ``served`` figures (what train-router prints), and on texts never trained on (the
1,335 lines after 10,000 and bench/data/general_prompts_dev.jsonl): adapter-task texts served by their
adapter, no-adapter-task texts and general prompts served by the base model. The figures chose
``MIN_TEXTS_PER_TASK`` and the warning thresholds of ``dlplora train-router`` (docs/routing.md,
"How much data").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

from dlplora_triton.demo.tasks import load_texts
from dlplora_triton.routing import Router, read_labelled_jsonl

HERE = Path(__file__).resolve().parent
GENERAL_DEV = HERE / "data" / "general_prompts_dev.jsonl"
ADAPTERS = ["code", "de", "fr", "ja", "ru", "zh"]  # the README's train-router example
ALL_TASKS = [*ADAPTERS, "es", "license", "shell"]
TASK_SETS = {"2 tasks": ["code", "de"], "6 tasks": ADAPTERS, "9 tasks (6 adapters)": ALL_TASKS}
TRAIN_LINES = 10_000


def _rate(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def measure(router: Router, unseen_x, unseen_y, general_x) -> dict:
    """On texts never trained on: adapter tasks to their adapter, the rest and general prompts to base."""
    to_base = (router.base_proba(unseen_x) >= router.base_threshold).tolist()
    top = [router.names[j] for j in router.predict_proba(unseen_x).argmax(dim=1).tolist()]
    served_by = {c: router.adapter_of.get(c) for c in set(unseen_y)}
    return {
        "unseen_adapter_tasks_to_their_adapter": _rate(
            not b and t == served_by[y] for b, t, y in zip(to_base, top, unseen_y) if served_by[y]
        ),
        "unseen_no_adapter_tasks_to_base": _rate(b for b, y in zip(to_base, unseen_y) if not served_by[y]),
        "general_dev_to_base": _rate((router.base_proba(general_x) >= router.base_threshold).tolist()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="12,25,50,100,200", help="texts per task, comma-separated")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated")
    parser.add_argument("--task-sets", default=",".join(TASK_SETS), help="of " + ", ".join(TASK_SETS))
    parser.add_argument("--out", type=Path, default=common.RESULTS / "cpu" / "router_data_size.json")
    args = parser.parse_args(argv)

    texts, tasks = load_texts()  # the text set's first version (9 tasks), as measured
    pool_x, pool_y = texts[:TRAIN_LINES], tasks[:TRAIN_LINES]
    unseen_x, unseen_y = texts[TRAIN_LINES:], tasks[TRAIN_LINES:]
    general_x, _ = read_labelled_jsonl(GENERAL_DEV, label_key="lang")
    rows = []
    for task_set in args.task_sets.split(","):
        names = TASK_SETS[task_set]
        for size in [int(s) for s in args.sizes.split(",")]:
            taken: dict[str, int] = {}
            train_x, train_y = [], []
            for x, y in zip(pool_x, pool_y):  # the file is ordered by a hash: a prefix per task is a sample
                if y in names and taken.get(y, 0) < size:
                    taken[y] = taken.get(y, 0) + 1
                    train_x.append(x)
                    train_y.append(y)
            keep = [i for i, y in enumerate(unseen_y) if y in names]
            test_x, test_y = [unseen_x[i] for i in keep], [unseen_y[i] for i in keep]
            for seed in [int(s) for s in args.seeds.split(",")]:
                start = time.perf_counter()
                router = Router.train(
                    train_x, train_y, adapters=[n for n in names if n in ADAPTERS], seed=seed
                )
                seconds = time.perf_counter() - start
                report, served = router.report, router.report["served"]
                row = {
                    "tasks": task_set,
                    "texts_per_task": size,
                    "seed": seed,
                    "heldout_accuracy": report["heldout_accuracy"],
                    "heldout_adapter_accuracy": served["adapter_accuracy"],
                    "heldout_background_to_base": served["base_rate"],
                    "epochs_run": report["epochs_run"],
                    "best_epoch": report["best_epoch"],
                    "train_seconds": round(seconds, 2),
                    **measure(router, test_x, test_y, general_x),
                }
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
    results = {"environment": common.environment("cpu"), "adapters": ADAPTERS, "rows": rows}
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
