"""The sentence router on the real text set: accuracy, training time, routing time.

    python bench/bench_router.py [--train 10000] [--seed 0] [--out bench/results/cpu/router.json]

Trains the default router (about 4.3M parameters) on the first ``--train`` lines of
dlplora_triton/data/router_texts.jsonl (the file is ordered by a hash, so every prefix holds every task), with
its own stratified 10% held-out split for early stopping and the report. The lines after ``--train``
were never seen in training: their accuracy is printed as "unseen", and 1,000 of them are the prompts
whose routing is timed (median of 7 runs after a warm-up; ``route`` = features + MLP + top-p). Targets
(2 CPU cores): held-out accuracy >= 98%, training < 2 minutes, routing 1,000 prompts < 1 s.
The router runs its tensor ops on one thread (see dlplora_triton/routing/router.py), so the machine's load
matters less than it would; the 1-minute load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import common

from dlplora_triton.routing import Router, format_report, read_labelled_jsonl

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "dlplora_triton" / "data" / "router_texts.jsonl"
RESULTS = common.RESULTS / "cpu"


def environment() -> dict:
    """common's stamp plus numpy, and the key the committed results used for the 1-minute load."""
    env = common.environment("cpu", packages=("numpy",))
    env["load_average_1min"] = env["load_average"][0]
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=10_000, help="lines used for training (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "router.json")
    args = parser.parse_args(argv)

    texts, tasks = read_labelled_jsonl(args.data)
    if len(texts) <= args.train:
        raise SystemExit(f"{args.data} has {len(texts)} lines; --train {args.train} leaves none unseen")
    train_x, train_y = texts[: args.train], tasks[: args.train]
    unseen_x, unseen_y = texts[args.train :], tasks[args.train :]

    start = time.perf_counter()
    router = Router.train(train_x, train_y, seed=args.seed)
    train_s = time.perf_counter() - start
    print(format_report(router.report))

    predicted = router.predict_proba(unseen_x).argmax(dim=1).tolist()
    unseen_acc = sum(router.names[i] == y for i, y in zip(predicted, unseen_y)) / len(unseen_y)

    prompts = unseen_x[:1000]
    times = common.interleaved_seconds({"route": lambda: router.route(prompts)}, 7, warmup=1)["route"]
    route_s = statistics.median(times)

    report = {k: v for k, v in router.report.items() if k != "history"}
    results = {
        "environment": environment(),
        "data": {
            "file": str(
                args.data.relative_to(HERE.parent) if args.data.is_relative_to(HERE.parent) else args.data
            ),
            "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "lines": len(texts),
            "train_lines": len(train_x),
            "unseen_lines": len(unseen_x),
            "tasks": {name: train_y.count(name) for name in router.names},
        },
        "router": {
            "features": router.features,
            "mlp": router.mlp_config,
            "parameters": router.num_parameters,
        },
        "heldout_accuracy": report["heldout_accuracy"],
        "per_task_accuracy": {name: row["accuracy"] for name, row in report["per_task"].items()},
        "confused_pairs": report["confused_pairs"],
        "unseen_accuracy": unseen_acc,
        "train_seconds": train_s,
        "route_1000_seconds": route_s,
        "route_1000_seconds_all": times,
        "report": report,
    }
    print(f"unseen lines: accuracy {unseen_acc:.4f} on {len(unseen_y)}")
    print(f"training on {len(train_x)} sentences: {train_s:.1f} s")
    print(f"routing {len(prompts)} prompts: {route_s * 1e3:.1f} ms (median of {len(times)})")
    common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
