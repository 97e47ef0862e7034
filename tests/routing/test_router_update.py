"""Changing a trained router without retraining: ``Router.add_task`` (routing/update.py), ``without_adapter``,
the replay sample saved beside the router, and ``dlplora train-router --router DIR --add TASK=FILE``.

A small router (seconds) trained on 200 texts of each of 5 tasks (code, de, fr, ja, ru) plus the
general prompts; zh is added from 100 of its texts. Accuracy against retraining from scratch at full
size: bench/bench_router_update.py (docs/routing.md, "Adding a task").
"""

import json
from pathlib import Path

import pytest
import torch

from dlplora_triton.cli import main
from dlplora_triton.routing import GENERAL, Router, read_labelled_jsonl
from dlplora_triton.routing.update import REPLAY_FILE, REPLAY_GENERAL, REPLAY_PER_CLASS

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "dlplora_triton" / "data" / "router_texts.jsonl"
OLD = ["code", "de", "fr", "ja", "ru"]
SMALL = {"num_buckets": 2**14, "hidden": (64,), "epochs": 10, "batch_size": 64}


@pytest.fixture(scope="module")
def data():
    texts, tasks = read_labelled_jsonl(DATA)
    per_task: dict[str, list[str]] = {}
    for text, task in zip(texts, tasks):
        per_task.setdefault(task, []).append(text)
    return per_task


@pytest.fixture(scope="module")
def router(data):
    texts = [t for task in OLD for t in data[task][:200]]
    tasks = [task for task in OLD for _ in data[task][:200]]
    return Router.train(texts, tasks, seed=0, **SMALL)


@pytest.fixture(scope="module")
def grown(router, data):
    return router.add_task("zh", data["zh"][:100])


def _served(router, texts, adapter):
    """The fraction of ``texts`` whose route's first adapter is ``adapter`` (None: the base model)."""
    routes = router.route(texts, p=0.8)
    return sum((route[0][0] if route else None) == adapter for route in routes) / len(texts)


def test_training_keeps_a_replay_sample_of_each_class(router, data):
    replay = router.replay
    labels = replay["labels"]
    assert set(replay) == {"indices", "offsets", "labels"} and replay["offsets"].shape == labels.shape
    from dlplora_triton.routing.features import featurize

    first = data[router.classes[int(labels[0])]] if router.classes[int(labels[0])] in data else None
    bag = replay["indices"][: int(replay["offsets"][1])]  # the first text's bucket ids
    assert first is None or any(torch.equal(bag, featurize([t], router.features)[0]) for t in first[:200])
    counts = dict(zip(router.classes, torch.bincount(labels, minlength=len(router.classes)).tolist()))
    general = counts.pop(GENERAL)
    assert all(0 < n <= REPLAY_PER_CLASS for n in counts.values()), counts
    # the general prompts whole (those of the training split): every chat prompt holds an addition back
    assert REPLAY_PER_CLASS < general <= REPLAY_GENERAL


def test_an_added_task_is_routed_and_the_old_ones_still_are(router, grown, data):
    unseen = data["zh"][300:360]
    assert _served(router, unseen, "zh") == 0  # not a task of the router: never routed there
    assert grown.names == sorted([*OLD, "zh"]) and grown.classes[-1] == "zh"
    # 0.9 and up at full size (docs/routing.md); this router of 16k buckets learnt zh from 100 texts
    assert _served(grown, unseen, "zh") >= 0.6
    for task in OLD:  # ja, which shares its kanji with zh, included
        texts = data[task][400:440]
        assert _served(grown, texts, task) >= _served(router, texts, task) - 0.05, task
    entry = grown.report["updates"][-1]
    assert (entry["task"], entry["adapter"], entry["method"], entry["texts"]) == ("zh", "zh", "full", 100)
    assert entry["own_texts_top"] >= 0.8 and entry["seconds"] > 0


def test_adding_leaves_the_router_given_as_it_was(router, data):
    before = {k: v.clone() for k, v in router.net.state_dict().items()}
    classes, replay = list(router.classes), router.replay["indices"].clone()
    first = router.add_task("zh", data["zh"][:40], seed=3, epochs=2)
    again = router.add_task("zh", data["zh"][:40], seed=3, epochs=2)
    assert router.classes == classes and torch.equal(router.replay["indices"], replay)
    assert all(torch.equal(v, router.net.state_dict()[k]) for k, v in before.items())  # its table too
    assert (
        router.add_task("zh", data["zh"][:40], method="head", epochs=1).net.embedding is router.net.embedding
    )
    for key, value in first.net.state_dict().items():  # bit for bit from the same inputs and seed
        assert torch.equal(value, again.net.state_dict()[key]), key


def test_the_row_method_leaves_the_old_classes_logits_alone(router, data):
    grown = router.add_task("zh", data["zh"][:100], method="row")
    texts = data["de"][400:420] + data["zh"][300:320]
    old, new = router.class_logits(texts), grown.class_logits(texts)
    assert torch.equal(new[:, : len(router.classes)], old)
    assert _served(grown, data["zh"][300:360], "zh") >= 0.8


def test_a_known_class_is_fitted_again_and_mapped(grown, data):
    router = grown.without_adapter("zh")  # zh: a background class now
    assert "zh" in router.background
    again = router.add_task("zh", data["zh"][100:160], adapter="chinese")
    assert again.classes == router.classes and again.adapter_of["zh"] == "chinese"
    assert _served(again, data["zh"][300:340], "chinese") >= 0.8
    row = router.classes.index("zh")
    assert int((again.replay["labels"] == row).sum()) == 60  # its old replay gave way to the new texts


def test_without_adapter_sends_its_texts_to_the_base_model(grown, data):
    less = grown.without_adapter("zh")
    assert less.names == OLD and "zh" in less.background and less.net is grown.net
    assert _served(less, data["zh"][300:340], None) >= 0.75  # the rest: its neighbour ja
    with pytest.raises(KeyError, match="does not route to 'nosuch'"):
        grown.without_adapter("nosuch")
    two = Router.train(["a b c"] * 3 + ["x y z"] * 3, ["a"] * 3 + ["b"] * 3, adapters=["a"], **SMALL)
    assert two.without_adapter("a") is None  # nothing left to route to


def test_the_replay_sample_is_saved_and_a_loaded_router_grows_the_same(router, grown, data, tmp_path):
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert all(torch.equal(loaded.replay[k], router.replay[k]) for k in router.replay)
    again = loaded.add_task("zh", data["zh"][:100])
    texts = data["zh"][300:310] + data["fr"][400:410]
    assert torch.equal(again.predict_proba(texts), grown.predict_proba(texts))
    grown.save(tmp_path / "g")
    reloaded = Router.load(tmp_path / "g")
    assert reloaded.classes == grown.classes and reloaded.report["updates"] == grown.report["updates"]
    assert torch.equal(reloaded.predict_proba(texts), grown.predict_proba(texts))
    router.replay, saved = None, router.replay
    try:
        router.save(tmp_path / "g")  # the stale sample of the grown router is removed
        assert not (tmp_path / "g" / REPLAY_FILE).exists() and Router.load(tmp_path / "g").replay is None
    finally:
        router.replay = saved


def test_errors_name_the_problem(router, grown, data, tmp_path):
    with pytest.raises(ValueError, match="20 to 20000 example texts, got 5"):
        router.add_task("zh", data["zh"][:5])
    with pytest.raises(ValueError, match="general prompts' class"):
        router.add_task(GENERAL, data["zh"][:30])
    with pytest.raises(ValueError, match="method must be one of"):
        router.add_task("zh", data["zh"][:30], method="all")
    with pytest.raises(ValueError, match="empty or blank"):
        router.add_task("zh", data["zh"][:30] + [" "])
    few = router.add_task("zh", data["zh"][:30])
    assert "added from 30 texts" in few.report["updates"][-1]["warnings"][0]
    grown.save(tmp_path / "r")
    replay = tmp_path / "r" / REPLAY_FILE
    from safetensors.torch import save_file

    save_file({"vectors": torch.zeros(3, 5), "labels": torch.zeros(3, dtype=torch.int64)}, str(replay))
    with pytest.raises(ValueError, match="is not a replay sample of this router"):
        Router.load(tmp_path / "r")
    bad = {k: v.clone() for k, v in grown.replay.items()}
    bad["indices"][0] = grown.features["num_buckets"]  # a bucket the table does not have
    save_file(bad, str(replay))
    with pytest.raises(ValueError, match="is not a replay sample of this router"):
        Router.load(tmp_path / "r")
    replay.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Router.load(tmp_path / "r")
    replay.unlink()
    with pytest.raises(ValueError, match="saved without a replay sample"):
        Router.load(tmp_path / "r").add_task("es", data["es"][:30])


def test_train_router_add(router, data, tmp_path, capsys):
    router.save(tmp_path / "r")
    examples = tmp_path / "zh.jsonl"
    lines = [{"text": t, "task": "zh"} for t in data["zh"][:100]] + [{"text": "Hallo Welt", "task": "de"}]
    examples.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")
    args = ["train-router", "--router", str(tmp_path / "r"), "--add", f"zh={examples}"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "added 'zh' from 100 texts" in out and "'zh'" in out.splitlines()[-1]
    saved = Router.load(tmp_path / "out")
    assert saved.names == sorted([*OLD, "zh"]) and saved.report["updates"][-1]["texts"] == 100
    examples.write_text('{"text": "ok"}\n[1]\n')
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "line 2 of --add zh=" in capsys.readouterr().err
    assert main(["train-router", "--add", f"zh={examples}", "--out", str(tmp_path / "x")]) == 2
    assert "--add extends a saved router: give --router DIR" in capsys.readouterr().err
