"""The router's training warnings (``report["warnings"]``): too few texts per task, poor held-out accuracy,
adapter-task texts missing their adapter, background texts not reaching the base model; each with its
numbers (thresholds measured in bench/bench_router_data_size.py, docs/routing.md "How much data")."""

from dlplora_triton.defaults import MIN_TEXTS_PER_TASK
from dlplora_triton.routing import Router
from dlplora_triton.routing.train import _quality_warnings, format_warnings

TINY = {"num_buckets": 2**10, "hidden": (8,), "epochs": 2, "background": None}


def _texts(per_task: int) -> tuple[list[str], list[str]]:
    texts = [f"Die Datei {i} wird gelöscht." for i in range(per_task)]
    texts += [f"def f{i}(x): return x + {i}" for i in range(per_task)]
    return texts, ["de"] * per_task + ["code"] * per_task


def _report(accuracy=1.0, adapter=1.0, base=1.0) -> dict:
    served = {"adapter_accuracy": adapter, "adapter_texts": 30, "base_rate": base, "background_texts": 84}
    return {"heldout_accuracy": accuracy, "served": served}


def test_a_good_report_has_no_warning():
    assert _quality_warnings(_report(), {"de": 50, "code": 200}) == []
    assert format_warnings({"warnings": []}) is None and format_warnings({}) is None


def test_each_problem_is_named_with_its_numbers():
    problems = _quality_warnings(_report(0.023, 0.5, 0.0), {"de": 12, "code": 12, "fr": 60})
    assert problems == [
        f"2 of 3 tasks have fewer than {MIN_TEXTS_PER_TASK} texts (code 12, de 12)",
        "held-out accuracy 2.3% (want >= 90%)",
        "50.0% of 30 held-out adapter-task texts reach their adapter (want >= 85%)",
        "0.0% of 84 held-out background texts go to the base model (want >= 85%)",
    ]
    line = format_warnings({"warnings": problems})
    assert "\n" not in line and line.startswith("this router may route badly: 2 of 3 tasks")
    assert f"at least {MIN_TEXTS_PER_TASK} texts" in line and "How much data" in line


def test_figures_that_were_not_measured_warn_about_nothing():
    report = {"heldout_accuracy": None, "served": {"adapter_accuracy": None, "base_rate": None}}
    assert _quality_warnings(report, {"de": 1, "code": MIN_TEXTS_PER_TASK}) == [
        f"1 of 2 tasks have fewer than {MIN_TEXTS_PER_TASK} texts (de 1)"
    ]


def test_a_long_list_of_small_tasks_is_cut():
    (problem,) = _quality_warnings(_report(), {f"t{i}": i + 1 for i in range(9)})
    assert (
        problem
        == f"9 of 9 tasks have fewer than {MIN_TEXTS_PER_TASK} texts (t0 1, t1 2, t2 3, t3 4, t4 5, t5 6 and 3 more)"
    )


def test_training_fills_the_warnings_and_saving_keeps_them(tmp_path):
    small = Router.train(*_texts(8), **TINY)
    assert (
        small.report["warnings"][0]
        == f"2 of 2 tasks have fewer than {MIN_TEXTS_PER_TASK} texts (code 8, de 8)"
    )
    assert Router.load(small.save(tmp_path / "r")).report["warnings"] == small.report["warnings"]
    enough = Router.train(*_texts(MIN_TEXTS_PER_TASK), **{**TINY, "epochs": 5})
    assert enough.report["heldout_accuracy"] == 1.0 and enough.report["warnings"] == []
