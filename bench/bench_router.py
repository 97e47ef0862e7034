"""The sentence router on the real text set: accuracy, abstention, training time, routing time.

    python bench/bench_router.py [--unseen 3000] [--seed 0] [--out bench/results/cpu/router.json]

Trains the default router (about 4.3M parameters) on all but the last ``--unseen`` lines of
dlplora_triton/data/router_texts.jsonl (34 tasks; the file is ordered by a hash, so every prefix holds every
task), with its own stratified 10% held-out split for early stopping and the report. The last lines
were never seen in training: their top-1 accuracy over all tasks is printed as "unseen", and 1,000 of
them are the prompts whose routing is timed: as a batch (median of 7 runs after a warm-up; ``route`` =
features + MLP + top-p), and one prompt per call in a process of its own (the saved router loaded in a
fresh interpreter; p50 and p99 over the 1,000 calls after 100 warm-up calls). Targets (2 CPU cores):
top-1 accuracy >= 98% on held-out texts over all tasks, training <= 60 s, routing <= 1 ms per prompt
at p99.
The router runs its tensor ops on one thread (see dlplora_triton/routing/router.py), so the machine's load
matters less than it would; the 1-minute load average is recorded with the results.

Abstention (docs/routing.md, "Abstention"): the router trained on the tasks plus the package's general
prompts is given the 6 adapters of dlplora_triton/data/adapters/smollm2/ (``with_adapters``: the other 28 tasks
become background). On the unseen lines: the fraction of the 6 tasks' texts served by their own adapter
(target >= 99%) and of the other tasks' texts served by the base model (target >= 95%); on general
chat prompts never trained on (bench/data/general_prompts_dev.jsonl, used while the training prompts
were written, and general_prompts_test.jsonl, written after they were frozen): the fraction served by
the base model (target >= 95%), at base thresholds 0.3 / 0.5 (the default) / 0.7. Two references: the
closed-set router of before (no background: the fraction of general prompts that reach one of the 6
adapters), and a router that never saw the tasks without an adapter (how far the background
generalises to tasks it was not shown).
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
DATA, GENERAL_SETS = common.ROUTER_DATA, common.GENERAL_SETS
RESULTS = common.RESULTS / "cpu"
ADAPTERS = common.ADAPTER_TASKS
THRESHOLDS = (0.3, 0.5, 0.7)
ISSUE_PROMPTS = ["hello", "hello, how are you?", "What is the capital of France?"]


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def abstention(router: Router, unseen_x, unseen_y, general: dict) -> dict:
    """Served accuracy, base rates and per-language general figures of ``router`` at each threshold."""
    probs, base = router.predict_proba(unseen_x), router.base_proba(unseen_x)
    top = [router.names[j] for j in probs.argmax(dim=1).tolist()]
    served_by = {c: router.adapter_of.get(c) for c in set(unseen_y)}
    out = {}
    for threshold in THRESHOLDS:
        to_base = (base >= threshold).tolist()
        row = {
            "adapter_tasks_served_by_their_adapter": _rate(
                [not b and t == served_by[y] for b, t, y in zip(to_base, top, unseen_y) if served_by[y]]
            ),
            "no_adapter_tasks_served_by_base": _rate(
                [b for b, y in zip(to_base, unseen_y) if not served_by[y]]
            ),
            "per_task": {
                y: _rate(
                    [
                        (b if not served_by[y] else (not b and t == served_by[y]))
                        for b, t, yy in zip(to_base, top, unseen_y)
                        if yy == y
                    ]
                )
                for y in sorted(set(unseen_y))
            },
        }
        for name, (texts, langs) in general.items():
            g_base = (router.base_proba(texts) >= threshold).tolist()
            row[f"general_{name}_served_by_base"] = _rate(g_base)
            row[f"general_{name}_per_language"] = {
                lang: _rate([b for b, la in zip(g_base, langs) if la == lang])
                for lang in dict.fromkeys(langs)
            }
            if threshold == router.base_threshold:
                row[f"general_{name}_missed"] = [
                    {"text": t, "lang": la, "base_proba": round(p, 4), "routed": r}
                    for t, la, p, b, r in zip(
                        texts, langs, router.base_proba(texts).tolist(), g_base, router.route(texts)
                    )
                    if not b
                ]
        out[str(threshold)] = row
    return out


_ONE_PROMPT_TIMER = """
import json, sys, time
from dlplora_triton.routing import Router
router = Router.load(sys.argv[1])
prompts = json.load(open(sys.argv[2], encoding="utf-8"))
for p in prompts[:100]:
    router.route([p])
times = []
for p in prompts:
    start = time.perf_counter()
    router.route([p])
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def per_prompt_seconds(router: Router, prompts: list[str]) -> dict:
    """Milliseconds of ``route([prompt])``, one prompt per call, in a fresh interpreter that loads the
    saved router (as a server would): p50, p99 and the maximum over ``prompts``."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        router.save(Path(tmp) / "router")
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _ONE_PROMPT_TIMER,
                str(Path(tmp) / "router"),
                str(Path(tmp) / "prompts.json"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    times = sorted(json.loads(done.stdout.strip().splitlines()[-1]))
    at = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))] * 1e3  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "max": times[-1] * 1e3, "prompts": len(times)}


def environment() -> dict:
    """common's stamp plus numpy, and the key the committed results used for the 1-minute load."""
    env = common.environment("cpu", packages=("numpy",))
    env["load_average_1min"] = env["load_average"][0]
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--unseen", type=int, default=3000, help="last lines never trained on (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "router.json")
    args = parser.parse_args(argv)

    texts, tasks = read_labelled_jsonl(args.data)
    if not 0 < args.unseen < len(texts):
        raise SystemExit(
            f"{args.data} has {len(texts)} lines; --unseen {args.unseen} must be between 1 and that"
        )
    train = len(texts) - args.unseen
    train_x, train_y = texts[:train], tasks[:train]
    unseen_x, unseen_y = texts[train:], tasks[train:]

    general = {name: read_labelled_jsonl(path, label_key="lang") for name, path in GENERAL_SETS.items()}

    start = time.perf_counter()
    router = Router.train(train_x, train_y, seed=args.seed)  # the tasks + the general prompts (background)
    train_s = time.perf_counter() - start
    print(format_report(router.report))

    predicted = router.predict_proba(unseen_x).argmax(dim=1).tolist()
    unseen_acc = sum(router.names[i] == y for i, y in zip(predicted, unseen_y)) / len(unseen_y)

    prompts = unseen_x[:1000]
    times = common.interleaved_seconds({"route": lambda: router.route(prompts)}, 7, warmup=1)["route"]
    route_s = statistics.median(times)
    per_prompt = per_prompt_seconds(router, prompts)

    served = router.with_adapters(ADAPTERS)
    abstain = abstention(served, unseen_x, unseen_y, general)
    at = abstain[str(served.base_threshold)]
    print(
        f"abstention at base_threshold {served.base_threshold} ({len(ADAPTERS)} adapters, background "
        f"{served.background}): adapter tasks served by their adapter {at['adapter_tasks_served_by_their_adapter']:.4f}, "
        f"no-adapter tasks served by the base model {at['no_adapter_tasks_served_by_base']:.4f}, general prompts "
        f"served by the base model: dev {at['general_dev_served_by_base']:.4f}, test {at['general_test_served_by_base']:.4f}"
    )
    issue = {t: served.route([t])[0] for t in ISSUE_PROMPTS}
    print(f"the issue's prompts: {issue}")

    # reference 1: the closed-set router of before (no background), 6 of its 9 tasks served
    closed = Router.train(train_x, train_y, seed=args.seed, background=None)
    closed_general = {}
    for name, (texts, _) in general.items():
        top = [closed.names[j] for j in closed.predict_proba(texts).argmax(dim=1).tolist()]
        closed_general[name] = _rate([t in ADAPTERS for t in top])
    print(
        f"closed-set router (no background): general prompts whose top task has an adapter: {closed_general}"
    )

    # reference 2: background never shown es / license / shell
    keep = [i for i, y in enumerate(train_y) if y in ADAPTERS]
    blind = Router.train([train_x[i] for i in keep], [train_y[i] for i in keep], seed=args.seed)
    blind_base = blind.base_proba(unseen_x) >= blind.base_threshold
    unseen_tasks = {
        y: _rate([b for b, yy in zip(blind_base.tolist(), unseen_y) if yy == y])
        for y in sorted(set(unseen_y) - set(ADAPTERS))
    }
    print(
        f"router never shown the tasks without an adapter: their unseen texts served by the base model: {unseen_tasks}"
    )

    report = {k: v for k, v in router.report.items() if k != "history"}
    results = {
        "environment": environment(),
        "data": {
            "file": str(
                args.data.relative_to(HERE.parent) if args.data.is_relative_to(HERE.parent) else args.data
            ),
            "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "lines": len(train_x) + len(unseen_x),
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
        "route_one_prompt_ms": per_prompt,
        "abstention": {
            "adapters": ADAPTERS,
            "background": served.background,
            "base_threshold": served.base_threshold,
            "general_prompts": {
                name: {"file": str(path.relative_to(HERE.parent)), "prompts": len(general[name][0])}
                for name, path in GENERAL_SETS.items()
            },
            "by_threshold": abstain,
            "issue_prompts": issue,
            "closed_set_general_to_an_adapter": closed_general,
            "never_shown_tasks_served_by_base": unseen_tasks,
            "goals": {
                "adapter_tasks_served_by_their_adapter >= 0.99": at["adapter_tasks_served_by_their_adapter"]
                >= 0.99,
                "no_adapter_tasks_served_by_base >= 0.95": at["no_adapter_tasks_served_by_base"] >= 0.95,
                "general_dev_served_by_base >= 0.95": at["general_dev_served_by_base"] >= 0.95,
                "general_test_served_by_base >= 0.95": at["general_test_served_by_base"] >= 0.95,
            },
        },
        "report": report,
    }
    print(f"unseen lines: accuracy {unseen_acc:.4f} on {len(unseen_y)}")
    print(f"training on {len(train_x)} sentences: {train_s:.1f} s")
    print(f"routing {len(prompts)} prompts: {route_s * 1e3:.1f} ms (median of {len(times)})")
    print(
        f"one prompt per call, in a process of its own: p50 {per_prompt['p50']:.3f} ms, p99 {per_prompt['p99']:.3f} ms"
    )
    common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
