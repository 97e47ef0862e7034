"""Adapter loads and evictions on vLLM's ``/metrics``: what a fleet of adapters costs, counted.

vLLM's workers load an adapter from disk into their host cache (``--max-cpu-loras`` of them), evict the
least recently used one when it is full, and page adapters in and out of the ``--max-loras`` slots the
kernels read. None of that is counted by vLLM. The plugin counts it in each worker process and the
API server reports the sums on ``/metrics``:

- ``dlplora_adapter_loads_total``: adapters read from disk into a worker's host cache;
- ``dlplora_adapter_evictions_total{cache="cpu"}``: dropped from the host cache to make room;
- ``dlplora_adapter_evictions_total{cache="slots"}``: moved out of a slot to make room;
- ``dlplora_adapter_activations_total``: moved into a slot.

Workers run in other processes than the API server (vLLM's engine core and its workers), so each
writes its counts to a small JSON file in ``DLPLORA_METRICS_DIR``, replaced whole on every change; the
API server's collector sums the files when ``/metrics`` is read. With tensor or pipeline parallelism
one worker per engine counts (:func:`counts_here`), so the counts do not grow with the workers. The
plugin makes that folder when vLLM loads it in the first process (the one that starts the others,
which inherit it) and removes it when that process exits. With ``--api-server-count`` above 1 vLLM builds its own registry per scrape,
which this collector is not part of: the counts are then in the files only.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["METRICS_DIR_ENV", "AdapterCounters", "AdapterMetricsCollector", "install_adapter_metrics"]

METRICS_DIR_ENV = "DLPLORA_METRICS_DIR"
COUNTS = ("loads", "cpu_evictions", "slot_evictions", "activations")


def metrics_dir() -> Path:
    """The folder the processes of this deployment share for their counts (made here when unset)."""
    path = os.environ.get(METRICS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="dlplora-metrics-")
        os.environ[METRICS_DIR_ENV] = path  # vLLM's processes started from here inherit it
        atexit.register(shutil.rmtree, path, True)
    return Path(path)


class AdapterCounters:
    """This process's counts, written to ``<folder>/adapters-<pid>.json`` on every change."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.counts = dict.fromkeys(COUNTS, 0)

    def add(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount
        path = self.folder / f"adapters-{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(self.counts))
            os.replace(temporary, path)  # whole: a scrape never reads half a file
        except OSError:  # the folder went away (the server is stopping): counting must not fail a step
            pass


def read_counts(folder: Path) -> dict[str, int]:
    """The sums over every process's file in ``folder`` (a file being replaced counts as absent)."""
    totals = dict.fromkeys(COUNTS, 0)
    for path in Path(folder).glob("adapters-*.json"):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name in COUNTS:
            value = counts.get(name, 0)
            if isinstance(value, int) and value >= 0:
                totals[name] += value
    return totals


class AdapterMetricsCollector:
    """A prometheus_client collector reporting :func:`read_counts` of the deployment's folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        counts = read_counts(self.folder)
        loads = CounterMetricFamily(
            "dlplora_adapter_loads", "LoRA adapters read from disk into a worker's host cache"
        )
        loads.add_metric([], counts["loads"])
        evictions = CounterMetricFamily(
            "dlplora_adapter_evictions",
            "LoRA adapters evicted to make room: from a worker's host cache (cpu) or from a slot (slots)",
            labels=["cache"],
        )
        evictions.add_metric(["cpu"], counts["cpu_evictions"])
        evictions.add_metric(["slots"], counts["slot_evictions"])
        activations = CounterMetricFamily(
            "dlplora_adapter_activations", "LoRA adapters moved into a slot the kernels read"
        )
        activations.add_metric([], counts["activations"])
        return [loads, evictions, activations]


_installed: AdapterCounters | None = None


def counts_here() -> bool:
    """Whether this process's LoRA manager counts: one worker per engine does. With tensor or pipeline
    parallelism every worker loads, evicts and activates each adapter (its own shard or stage), so the
    sums on ``/metrics`` would count each event once per worker; only the first pipeline stage's
    tensor rank 0 counts (each data-parallel replica has its own)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return True
    return get_tp_group().rank_in_group == 0 and get_pp_group().is_first_rank


def install_adapter_metrics() -> AdapterCounters:
    """Count in this process's LoRA managers and report on its prometheus registry (idempotent)."""
    global _installed
    if _installed is not None:
        return _installed
    from prometheus_client import REGISTRY
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    folder = metrics_dir()
    counters = AdapterCounters(folder)
    load_adapter = WorkerLoRAManager._load_adapter
    remove_oldest = LRUCacheLoRAModelManager.remove_oldest_adapter
    activate = LRUCacheLoRAModelManager.activate_adapter

    def counted_load(self, lora_request):
        lora = load_adapter(self, lora_request)
        if counts_here():
            counters.add("loads")
        return lora

    def counted_remove_oldest(self):
        removed = remove_oldest(self)
        if removed and counts_here():
            counters.add("cpu_evictions")
        return removed

    def counted_activate(self, lora_id):
        if lora_id not in self._active_adapters and counts_here():
            if len(self._active_adapters) >= self.lora_slots:
                counters.add("slot_evictions")
            counters.add("activations")
        return activate(self, lora_id)

    WorkerLoRAManager._load_adapter = counted_load
    LRUCacheLoRAModelManager.remove_oldest_adapter = counted_remove_oldest
    LRUCacheLoRAModelManager.activate_adapter = counted_activate
    REGISTRY.register(AdapterMetricsCollector(folder))
    _installed = counters
    return counters
