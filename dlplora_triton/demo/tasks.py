"""The SmolLM2 tasks: which texts of the package's text set train the adapters and the router, which are held out.

Each task is one label of ``dlplora_triton/data/router_texts.jsonl`` (Debian's translated man pages,
licence texts, Python source, shell help). The demo, the adapters and the benchmarks built on them read
the text set's first version (``load_texts``: its nine tasks, from the sources they had then), so that
the tasks and sources added later leave their splits as they were. Per task, the last ``HELD_OUT`` texts
in file order are held out (evaluation, demo prompts); everything before them trains the adapter and
the router.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "TASKS",
    "HELD_OUT",
    "ADAPTERS_DIR",
    "TEXTS_PATH",
    "FIRST_TASKS",
    "FIRST_SOURCES",
    "load_texts",
    "task_split",
    "adapter_paths",
]

TASKS = ("de", "fr", "ru", "ja", "zh", "code")
HELD_OUT = 100
# The six SmolLM2 task adapters ship inside the package (11 MB of package data), so `dlplora demo` runs
# after a plain pip install as well as in a checkout.
ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "data" / "adapters" / "smollm2"

TEXTS_PATH = Path(__file__).resolve().parents[1] / "data" / "router_texts.jsonl"
# The text set's first version (11,335 lines): these tasks, from sources of these kinds (a row's
# "source" starts with one). The second version added 25 tasks and, for de, fr, es, ja, ru, zh and
# code, program messages ("mo:") and Python code outside the standard library ("dist-packages:").
FIRST_TASKS = ("code", "de", "es", "fr", "ja", "license", "ru", "shell", "zh")
FIRST_SOURCES = ("man:", "stdlib:", "license:")


def load_texts(everything: bool = False) -> tuple[list[str], list[str]]:
    """``(texts, tasks)`` of the package's text set (bench/data/build_router_data.py made it; data/NOTICE):
    its first version's rows (see ``FIRST_TASKS``), in file order; with ``everything`` every row."""
    from ..readers import read_jsonl

    rows = read_jsonl(TEXTS_PATH, "the package's text set", ("text", "task", "source"))
    if not everything:
        rows = [r for r in rows if r["task"] in FIRST_TASKS and r["source"].startswith(FIRST_SOURCES)]
    return [r["text"] for r in rows], [r["task"] for r in rows]


def task_split(texts: list[str], tasks: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(train, held)``: task name -> its texts, for every name of ``TASKS``; ``ValueError`` if one is short."""
    by_task: dict[str, list[str]] = {name: [] for name in TASKS}
    for text, task in zip(texts, tasks):
        if task in by_task:
            by_task[task].append(text)
    for name, members in by_task.items():
        if len(members) < 2 * HELD_OUT:
            raise ValueError(f"task {name!r}: {len(members)} texts in the text set, need {2 * HELD_OUT}")
    return (
        {name: members[:-HELD_OUT] for name, members in by_task.items()},
        {name: members[-HELD_OUT:] for name, members in by_task.items()},
    )


def adapter_paths(directory: str | Path = ADAPTERS_DIR) -> dict[str, Path]:
    """Task name -> adapter folder of the committed SmolLM2 adapters; ``FileNotFoundError`` naming a missing one."""
    directory = Path(directory)
    paths = {name: directory / name for name in TASKS}
    for name, path in paths.items():
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"SmolLM2 adapter {name!r}: {str(path)!r} has no adapter_config.json (the package ships "
                f"them in {str(ADAPTERS_DIR)!r}; bench/train_task_adapters.py makes them)"
            )
    return paths
