"""Adapter load and eviction counts (integrations/vllm/adapter_metrics.py): per-process files, summed for
``/metrics``; the engine tests read them from a running server."""

import json

from dlplora_triton.integrations.vllm.adapter_metrics import (
    METRICS_DIR_ENV,
    AdapterCounters,
    AdapterMetricsCollector,
    metrics_dir,
    read_counts,
)


def test_counts_of_several_processes_are_summed(tmp_path):
    counters = AdapterCounters(tmp_path)
    counters.add("loads")
    counters.add("loads")
    counters.add("slot_evictions")
    # Another worker's file, a file half written by a crashed one, and one with nonsense values.
    (tmp_path / "adapters-99999.json").write_text(json.dumps({"loads": 3, "cpu_evictions": 1}))
    (tmp_path / "adapters-88888.json").write_text('{"loads": ')
    (tmp_path / "adapters-77777.json").write_text(json.dumps({"loads": -5, "activations": "many"}))
    assert read_counts(tmp_path) == {"loads": 5, "cpu_evictions": 1, "slot_evictions": 1, "activations": 0}


def test_collector_reports_prometheus_counters(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    AdapterCounters(tmp_path).add("cpu_evictions", 4)
    registry = CollectorRegistry()
    registry.register(AdapterMetricsCollector(tmp_path))
    text = generate_latest(registry).decode()
    assert "dlplora_adapter_loads_total 0.0" in text
    assert 'dlplora_adapter_evictions_total{cache="cpu"} 4.0' in text
    assert 'dlplora_adapter_evictions_total{cache="slots"} 0.0' in text
    assert "dlplora_adapter_activations_total 0.0" in text


def test_counting_never_fails_when_the_folder_is_gone(tmp_path):
    counters = AdapterCounters(tmp_path / "gone")
    counters.add("loads")
    assert counters.counts["loads"] == 1


def test_metrics_dir_is_made_once_and_inherited(monkeypatch, tmp_path):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    assert metrics_dir() == tmp_path
    monkeypatch.delenv(METRICS_DIR_ENV)
    made = metrics_dir()
    try:
        assert made.is_dir() and metrics_dir() == made
    finally:
        made.rmdir()
