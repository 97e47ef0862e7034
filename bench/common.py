"""What every bench script shares: the environment stamp, the results folder, a median timer, an
interleaved timer (several variants, one call each per round) and a JSON writer that can be called after every row (so a run cut off still leaves what it measured).

Scripts in bench/ import it as ``import common`` (python puts the script's folder on sys.path).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The sentence router's benchmarks (bench_router*.py): the text set, the general chat prompts never
# trained on, the tasks of the six SmolLM2 adapters (dlplora_triton/data/adapters/smollm2/), and the
# tasks the README's `dlplora train-router --tasks` trains on.
ROOT = Path(__file__).resolve().parents[1]
ROUTER_DATA = ROOT / "dlplora_triton" / "data" / "router_texts.jsonl"
GENERAL_SETS = {
    "dev": ROOT / "bench" / "data" / "general_prompts_dev.jsonl",
    "test": ROOT / "bench" / "data" / "general_prompts_test.jsonl",
}
ADAPTER_TASKS = ["code", "de", "fr", "ja", "ru", "zh"]
DOCUMENTED_TASKS = "code,de,fr,ja,ru,zh,es,license,shell"


def only_tasks(texts: list[str], tasks: list[str], spec: str) -> tuple[list[str], list[str]]:
    """The texts (and their tasks) of the tasks named in ``spec``, comma-separated, or all for "all"."""
    if spec == "all":
        return list(texts), list(tasks)
    chosen = set(spec.split(","))
    kept = [(x, t) for x, t in zip(texts, tasks) if t in chosen]
    return [x for x, _ in kept], [t for _, t in kept]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else _cpu_name()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str, packages: tuple[str, ...] = ()) -> dict:
    """Device, versions, commit, date, threads and load average (1, 5, 15 min), to stamp every result
    file with; ``packages`` adds the installed version of each named distribution (None if absent)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent
        ).stdout.strip()
    except OSError:
        commit = ""
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    env.update({name: _version(name) for name in packages})
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"sm_{props.major}{props.minor}"
    return env


def results_dir(device: str) -> Path:
    """bench/results/<device>/: "cpu" for any CPU, else the GPU's name (e.g. nvidia-h200)."""
    if not str(device).startswith("cuda"):
        return RESULTS / "cpu"
    name = device_name(device)
    return RESULTS / "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def median_ms(fn, device: str, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` after a warm-up call (compilation included there).

    CUDA: ``triton.testing.do_bench`` (CUDA events, its own warm-up and repeats). CPU: host clock,
    at least 5 calls and up to 0.2 s (quick) or 1 s of them.
    """
    if str(device).startswith("cuda"):
        import triton.testing

        fn()
        torch.cuda.synchronize()
        q = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8]
        )
        return tuple(q)
    fn()
    times = []
    deadline = time.perf_counter() + (0.2 if quick else 1.0)
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return pick(0.5), pick(0.2), pick(0.8)


def interleaved_seconds(providers: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Host-clock seconds per call of each provider, ``repeats`` samples each, after ``warmup`` calls
    each. The providers run interleaved (one call each per round), so a slow phase of a shared machine
    hits every provider of that round alike; compare them by per-round ratios."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` (folders created) through a temporary file, so a reader never
    sees half a file; call it after each row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


class _Stop(Exception):
    pass


def input_of_layer(model, index: int, ids, mask):
    """Hidden states entering decoder layer ``index`` of a transformers causal LM, ``[B, T, H]``;
    the layers above it are not run (the real-model scripts train and evaluate only upper layers)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = model.model.layers[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]
