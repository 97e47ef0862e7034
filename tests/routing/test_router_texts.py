"""The package's text set (dlplora_triton/data/router_texts.jsonl, bench/data/build_router_data.py): its
34 tasks, the sources every row names, the first version's rows that the demo and the adapters read,
and a small router (seconds) over all tasks. The full-size figures are bench/bench_router.py's and
bench/bench_router_sources.py's (docs/routing.md)."""

import hashlib
from collections import Counter

import pytest

from dlplora_triton.demo.tasks import FIRST_SOURCES, FIRST_TASKS, TEXTS_PATH, load_texts, task_split
from dlplora_triton.readers import read_jsonl
from dlplora_triton.routing import GENERAL, Router

SMALL = {"num_buckets": 2**14, "hidden": (64,), "epochs": 12, "batch_size": 64}
SOURCE_KINDS = {"man", "mo", "stdlib", "dist-packages", "license", "c", "perl", "javascript", "vim", "cmake"}
SOURCE_KINDS |= {"sql", "shellscript", "imports", "headers"}
ADAPTERS = ["code", "de", "fr", "ja", "ru", "zh"]


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(TEXTS_PATH, "the package's text set", ("text", "task", "source"))


def test_at_least_32_tasks_each_with_a_source(rows):
    counts = Counter(r["task"] for r in rows)
    assert len(counts) >= 32, sorted(counts)
    assert min(counts.values()) >= 480, counts  # zh's man pages give 480; every other task more
    assert {r["source"].partition(":")[0] for r in rows} == SOURCE_KINDS
    assert all(r["source"].partition(":")[2] for r in rows), "a source names its page, catalogue or file"
    # Every row's text is unique (a text under two tasks could not be labelled).
    assert len({r["text"] for r in rows}) == len(rows)
    # The six adapters' tasks have both kinds of source: man pages (standard library) and messages
    # (other Python packages): bench/bench_router_sources.py holds whole sources of each out.
    for task in ADAPTERS:
        kinds = {r["source"].partition(":")[0] for r in rows if r["task"] == task}
        expected = {"stdlib", "dist-packages", "imports", "headers"} if task == "code" else {"man", "mo"}
        assert kinds == expected, (task, kinds)
    # import statements and block headers, which a one-line prompt often is (``import numpy as np``)
    for kind in ("imports:", "headers:"):
        assert sum(r["source"].startswith(kind) for r in rows if r["task"] == "code") >= 200, kind


def test_first_version_rows_are_unchanged():
    """The demo, the SmolLM2 adapters' training split and the benchmarks built on them read these
    rows: the second version added tasks and sources after them, never changing them."""
    texts, tasks = load_texts()
    assert len(texts) == 11_335 and set(tasks) == set(FIRST_TASKS)
    digest = hashlib.sha256("\n".join(f"{t}\t{x}" for x, t in zip(texts, tasks)).encode()).hexdigest()
    assert digest == "08aa1fed46a2e2907b5093afad490555b772fa73993d98e8205f094571643886"
    train, held = task_split(texts, tasks)
    assert {name: len(v) for name, v in held.items()} == {name: 100 for name in held}
    everything, _ = load_texts(everything=True)
    assert len(everything) > len(texts) and set(texts) <= set(everything)
    assert FIRST_SOURCES == ("man:", "stdlib:", "license:")


def test_small_router_over_all_tasks(rows):
    per_task: dict[str, list[dict]] = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(r)
    train = [r for group in per_task.values() for r in group[:60]]
    unseen = [r for group in per_task.values() for r in group[60:75]]
    router = Router.train(
        [r["text"] for r in train], [r["task"] for r in train], adapters=ADAPTERS, seed=0, **SMALL
    )
    assert router.names == ADAPTERS and len(router.background) == len(per_task) - len(ADAPTERS) + 1
    assert GENERAL in router.background
    top = router.class_logits([r["text"] for r in unseen]).argmax(dim=1).tolist()
    accuracy = sum(router.classes[i] == r["task"] for i, r in zip(top, unseen)) / len(unseen)
    assert accuracy >= 0.85, f"top-1 over {len(per_task)} tasks, 60 texts each: {accuracy:.3f}"
