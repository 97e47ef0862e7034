"""The sentence router by prompt length: a few words, one line of code, a sentence, a paragraph.

    python bench/bench_router_lengths.py [--variants baseline,shape] [--train 10000] [--seeds 0,1]
        [--tasks code,de,fr,ja,ru,zh,es,license,shell | all] [--out bench/results/cpu/router_lengths.json]

Each variant (and seed) trains a router on the first ``--train`` lines of
dlplora_triton/data/router_texts.jsonl of the tasks ``--tasks`` (default the documented router's nine,
as the README's ``dlplora train-router --tasks``), plus the package's general prompts as bench_router.py
does, with its training options (VARIANTS); gives it the 6 adapters of
dlplora_triton/data/adapters/smollm2/ (the other tasks become background, as for the documented
router), and routes prompts cut from those tasks' lines after ``--train`` (never trained on), by length:

- ``words``: a window of 1 to 3 words of each unseen line (of 2 to 6 characters where most of the line
  is Chinese or Japanese, which do not separate words);
- ``line`` (code only): one-line statements of numpy's source (the Python running this script: not the
  standard library the code texts come from; module docstrings and string-only lines left out) and
  hand-written one-liners such as ``def fib(n):`` and ``import numpy as np`` (ONE_LINERS);
- ``sentence``: each unseen line as it is (what bench_router.py measures);
- ``paragraph``: 4 unseen lines of one task joined (code: by newlines, the rest by spaces).

For a task with an adapter a prompt is right when its adapter serves it (top-1 and not the base model);
``to_base`` and ``to_other_adapter`` count the two ways to miss. For a task without one (es, license,
shell) it is right when the base model serves it. Also per variant: the general prompts of
bench/data/general_prompts_{dev,test}.jsonl served by the base model, held-out and unseen-line accuracy,
the training time (wall and CPU), the time to route 1,000 unseen lines (median of 5 runs after a warm-up) and the
routes of the prompts the docs show (DOC_PROMPTS).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import statistics
import time
from pathlib import Path

import common
import numpy as np

from dlplora_triton.routing import Router, read_labelled_jsonl
from dlplora_triton.routing.augment import crop_units

HERE = Path(__file__).resolve().parent
DATA, GENERAL_SETS = common.ROUTER_DATA, common.GENERAL_SETS
ADAPTERS = common.ADAPTER_TASKS
PARAGRAPH_LINES = 4
NUMPY_LINES = 200
DOC_PROMPTS = [
    "Wie lösche ich einen Benutzer?",
    "def fib(n):",
    "hello, how are you?",
    "import numpy as np",
    "What is the capital of France?",
]
# What a user might type as a one-line Python prompt; written for this benchmark, not taken from a source.
ONE_LINERS = [
    "def fib(n):",
    "import numpy as np",
    "import torch",
    "for i in range(10):",
    "print('hello world')",
    "x = [i * i for i in range(10)]",
    "class Node:",
    "return a + b",
    "with open('data.txt') as f:",
    "if __name__ == '__main__':",
    "from collections import defaultdict",
    "def add(a, b): return a + b",
    "while True:",
    "except ValueError as e:",
    "self.items.append(item)",
    "df = pd.read_csv('data.csv')",
    "assert len(xs) == 3",
    "raise ValueError('bad input')",
    "def __init__(self, name):",
    "nums.sort(key=lambda n: -n)",
    "d = {k: v for k, v in pairs}",
    "async def fetch(url):",
    "await asyncio.sleep(1)",
    "os.path.join(root, name)",
    "data = json.loads(text)",
    "total = sum(x for x in range(100))",
    "s = input()",
    "print(f'{name} is {age}')",
    "def is_prime(n):",
    "model.fit(X, y)",
    "plt.plot(x, y)",
    "arr = np.zeros((3, 4))",
    "return sorted(set(words))",
    "elif x > 0:",
    "counter += 1",
    "def main():",
    "if not os.path.exists(path):",
    "lst = list(map(int, input().split()))",
    "def reverse_string(s):",
    "import pandas as pd",
]
# Training options of each variant (Router.train's keywords; the defaults are the package's).
VARIANTS = {
    "baseline": {"short_crops": 0, "shape_ngrams": None},
    "crops1": {"short_crops": 1, "shape_ngrams": None},
    "crops2": {"short_crops": 2, "shape_ngrams": None},
    "shape": {"short_crops": 0, "shape_ngrams": (2, 4)},
    "shape_crops1": {"short_crops": 1, "shape_ngrams": (2, 4)},
    "shape_crops2": {"short_crops": 2, "shape_ngrams": (2, 4)},
}


def _mostly_cjk(text: str) -> bool:
    units = crop_units(text)
    return sum(end - start == 1 and ord(text[start]) >= 0x3040 for start, end in units) > len(units) / 2


def word_crops(texts: list[str], seed: int) -> list[str]:
    """One window of 1 to 3 words (2 to 6 characters of a mostly CJK text) of each text."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        units = crop_units(text)
        low, high = (2, 6) if _mostly_cjk(text) else (1, 3)
        size = min(int(rng.integers(low, high + 1)), len(units))
        first = int(rng.integers(0, len(units) - size + 1))
        out.append(text[units[first][0] : units[first + size - 1][1]])
    return out


def numpy_one_liners(count: int) -> list[str]:
    """``count`` one-line statements of numpy's Python source (tests left out), picked by a hash of the
    line: assignments, calls, imports, returns, ``def`` and ``class`` lines; no docstrings."""
    root = Path(np.__file__).resolve().parent
    lines = set()
    for path in sorted(root.rglob("*.py")):
        if "tests" in path.parts:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        rows = source.splitlines()
        for node in ast.walk(tree):
            if (
                not isinstance(node, ast.stmt)
                or isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
            ):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                line = rows[node.lineno - 1].strip()  # the def / class line alone
                if not line.endswith(":"):
                    continue
            elif node.lineno == node.end_lineno:
                line = rows[node.lineno - 1].strip()
            else:
                continue
            if 8 <= len(line) <= 80 and not line.startswith(("#", '"', "'")):
                lines.add(line)
    ranked = sorted(lines, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return ranked[:count]


def strata(unseen_x: list[str], unseen_y: list[str], seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """``{stratum: (prompts, tasks)}`` cut from the unseen lines (and numpy's source for ``line``)."""
    crops = word_crops(unseen_x, seed)
    out = {"words": (crops, list(unseen_y)), "sentence": (list(unseen_x), list(unseen_y))}
    code_lines = numpy_one_liners(NUMPY_LINES) + ONE_LINERS
    out["line"] = (code_lines, ["code"] * len(code_lines))
    paragraphs, tasks = [], []
    for task in sorted(set(unseen_y)):
        members = [x for x, y in zip(unseen_x, unseen_y) if y == task]
        joiner = "\n" if task == "code" else " "
        for start in range(0, len(members) - PARAGRAPH_LINES + 1, PARAGRAPH_LINES):
            paragraphs.append(joiner.join(members[start : start + PARAGRAPH_LINES]))
            tasks.append(task)
    out["paragraph"] = (paragraphs, tasks)
    return out


def served(router: Router, prompts: list[str], tasks: list[str]) -> dict:
    """Per task and over the adapter tasks / the other tasks: how the prompts are served."""
    routes = router.route(prompts)
    per_task = {}
    for task in sorted(set(tasks)):
        got = [r for r, t in zip(routes, tasks) if t == task]
        adapter = router.adapter_of.get(task)
        firsts = [r[0][0] if r else None for r in got]
        row = {"prompts": len(got)}
        if adapter is None:
            row["right"] = sum(f is None for f in firsts) / len(got)
        else:
            row["right"] = sum(f == adapter for f in firsts) / len(got)
            row["to_base"] = sum(f is None for f in firsts) / len(got)
            row["to_other_adapter"] = sum(f not in (None, adapter) for f in firsts) / len(got)
        per_task[task] = row
    summary = {}
    for group, keep in (("adapter_tasks", True), ("other_tasks", False)):
        rows = [r for t, r in per_task.items() if (router.adapter_of.get(t) is not None) == keep]
        total = sum(r["prompts"] for r in rows)
        if total:
            summary[group] = {
                key: sum(r[key] * r["prompts"] for r in rows) / total for key in rows[0] if key != "prompts"
            } | {"prompts": total}
    return {"summary": summary, "per_task": per_task}


def run_variant(name: str, options: dict, train_x, train_y, prompts_by_stratum, general, seed: int) -> dict:
    start, start_cpu = time.perf_counter(), time.process_time()
    trained = Router.train(train_x, train_y, seed=seed, **options)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    router = trained.with_adapters(ADAPTERS)
    out = {
        "options": options,
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu_s,  # on a busy machine the wall time says more of the others
        "heldout_accuracy": trained.report["heldout_accuracy"],
        "crops": trained.report.get("num_crops", 0),
        "epochs_run": trained.report["epochs_run"],
    }
    predicted = trained.predict_proba(prompts_by_stratum["sentence"][0]).argmax(dim=1).tolist()
    truth = prompts_by_stratum["sentence"][1]
    out["unseen_accuracy"] = sum(trained.names[i] == y for i, y in zip(predicted, truth)) / len(truth)
    out["by_length"] = {s: served(router, x, y) for s, (x, y) in prompts_by_stratum.items()}
    out["general_served_by_base"] = {
        g: float((router.base_proba(texts) >= router.base_threshold).double().mean())
        for g, (texts, _) in general.items()
    }
    sentences = prompts_by_stratum["sentence"][0][:1000]
    times = common.interleaved_seconds({"route": lambda: router.route(sentences)}, 5, warmup=1)["route"]
    out["route_1000_seconds"] = statistics.median(times)
    out["doc_prompts"] = {
        p: [[n, round(w, 3)] for n, w in r] for p, r in zip(DOC_PROMPTS, router.route(DOC_PROMPTS))
    }
    out["line_misses"] = [
        {"prompt": p, "route": [[n, round(w, 3)] for n, w in r]}
        for p, r in zip(prompts_by_stratum["line"][0], router.route(prompts_by_stratum["line"][0]))
        if not r or r[0][0] != "code"
    ]
    line = out["by_length"]["line"]["summary"]["adapter_tasks"]
    print(
        f"{name:12s} seed {seed} train {train_s:5.1f} s ({train_cpu_s:.1f} s CPU)  route 1000 {out['route_1000_seconds'] * 1e3:.0f} ms  held-out {out['heldout_accuracy']:.4f}  unseen "
        f"{out['unseen_accuracy']:.4f}  general to base {out['general_served_by_base']}"
    )
    for stratum, result in out["by_length"].items():
        s = result["summary"]
        a, o = s.get("adapter_tasks", {}), s.get("other_tasks", {})
        print(
            f"  {stratum:9s} adapter tasks right {a.get('right', float('nan')):.3f} (base "
            f"{a.get('to_base', float('nan')):.3f}, other adapter {a.get('to_other_adapter', float('nan')):.3f}, "
            f"n={a.get('prompts', 0)}); tasks without adapter to base {o.get('right', float('nan')):.3f} "
            f"(n={o.get('prompts', 0)})"
        )
    print(f"  one-line code to code: {line['right']:.3f}; doc prompts: {out['doc_prompts']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--tasks", default=common.DOCUMENTED_TASKS, help="tasks, comma-separated, or 'all'")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "cpu" / "router_lengths.json")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    texts, tasks = read_labelled_jsonl(args.data)
    texts, tasks = common.only_tasks(texts, tasks, args.tasks)
    train_x, train_y = texts[: args.train], tasks[: args.train]
    unseen_x, unseen_y = texts[args.train :], tasks[args.train :]
    seeds = [int(s) for s in args.seeds.split(",")]
    prompts_by_stratum = strata(unseen_x, unseen_y, seed=1000)
    general = {name: read_labelled_jsonl(path, label_key="lang") for name, path in GENERAL_SETS.items()}

    results = {
        "environment": common.environment("cpu", packages=("numpy",)),
        "data": {
            "file": str(
                args.data.relative_to(HERE.parent) if args.data.is_relative_to(HERE.parent) else args.data
            ),
            "sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "tasks": sorted(set(tasks)),
            "train_lines": len(train_x),
            "unseen_lines": len(unseen_x),
            "seeds": seeds,
        },
        "adapters": ADAPTERS,
        "prompts": {s: len(x) for s, (x, _) in prompts_by_stratum.items()},
        "prompt_examples": {s: x[:: max(1, len(x) // 8)][:8] for s, (x, _) in prompts_by_stratum.items()},
        "variants": {
            name: {
                str(seed): run_variant(
                    name, VARIANTS[name], train_x, train_y, prompts_by_stratum, general, seed
                )
                for seed in seeds
            }
            for name in names
        },
    }
    common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
