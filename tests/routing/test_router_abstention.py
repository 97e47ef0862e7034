"""The router's abstention ("none of these": the base model serves the prompt): background classes,
with_adapters, base_proba / route / route_tensors, the saved format 2 and its errors, the commands.

A small router (seconds) trained on 300 texts of each of the 9 tasks of the text set, 6 of them served
by adapters (code, de, fr, ja, ru, zh, as in dlplora_triton/data/adapters/smollm2/), the other 3 background, plus the
package's general prompts. The full-size figures are bench/bench_router.py's (docs/routing.md).
"""

import json
from pathlib import Path

import pytest
import torch

from dlplora_triton.cli import main
from dlplora_triton.demo.tasks import load_texts
from dlplora_triton.routing import (
    BASE_THRESHOLD,
    CONFIG_FILE,
    GENERAL,
    Router,
    general_prompts,
    read_labelled_jsonl,
    top_p_select,
)

ROOT = Path(__file__).resolve().parents[2]
DEV_PROMPTS = ROOT / "bench" / "data" / "general_prompts_dev.jsonl"  # never trained on
ADAPTERS = ["code", "de", "fr", "ja", "ru", "zh"]
SMALL = {"num_buckets": 2**14, "hidden": (64,), "epochs": 12, "batch_size": 64}
ISSUE_PROMPTS = ["hello", "hello, how are you?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def split():
    texts, tasks = load_texts()  # the text set's first version: 9 tasks (the full set: test_router_texts.py)
    per_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        per_task.setdefault(t, []).append(i)
    train = [i for idx in per_task.values() for i in idx[:300]]
    unseen = [i for idx in per_task.values() for i in idx[300:340]]
    return ([texts[i] for i in train], [tasks[i] for i in train]), (
        [texts[i] for i in unseen],
        [tasks[i] for i in unseen],
    )


@pytest.fixture(scope="module")
def router(split):
    (texts, tasks), _ = split
    return Router.train(texts, tasks, adapters=ADAPTERS, seed=0, **SMALL)


def test_classes_names_and_background(router):
    assert router.classes == sorted([*ADAPTERS, "es", "license", "shell", GENERAL])
    assert router.names == ADAPTERS and router.can_abstain
    assert router.background == [GENERAL, "es", "license", "shell"]
    assert router.adapter_of["de"] == "de" and router.adapter_of["shell"] is None
    assert router.base_threshold == BASE_THRESHOLD == 0.3
    served = router.report["served"]
    assert served["adapter_accuracy"] >= 0.97 and served["base_rate"] >= 0.9, served


def test_off_topic_prompts_go_to_the_base_model(router, split):
    _, (unseen, truth) = split
    assert router.route(ISSUE_PROMPTS) == [[], [], []]
    chosen = router.route(unseen)
    served = [bool(c) and c[0][0] == t for c, t in zip(chosen, truth) if t in ADAPTERS]
    to_base = [c == [] for c, t in zip(chosen, truth) if t not in ADAPTERS]
    assert sum(served) / len(served) >= 0.97, "held-out texts of the adapters' tasks reach their adapter"
    assert sum(to_base) / len(to_base) >= 0.95, "held-out texts of tasks without an adapter reach the base"
    dev, _ = read_labelled_jsonl(DEV_PROMPTS, label_key="lang")
    assert not set(dev) & set(general_prompts()), "the measured prompts are never trained on"
    rate = sum(c == [] for c in router.route(dev)) / len(dev)
    assert rate >= 0.9, f"general prompts served by the base model: {rate:.3f}"


def test_probabilities_are_the_class_softmax_split(router, split):
    _, (unseen, _) = split
    texts = unseen[:30] + ISSUE_PROMPTS
    classes = torch.softmax(router.class_logits(texts).double(), dim=1)
    served = [router.classes.index(n) for n in router.names]
    background = [router.classes.index(c) for c in router.background]
    probs, base = router.predict_proba(texts), router.base_proba(texts)
    assert probs.shape == (len(texts), len(router.names)) and probs.dtype == torch.float32
    assert base.shape == (len(texts),) and base.dtype == torch.float32
    assert torch.allclose(probs.double().sum(dim=1), torch.ones(len(texts), dtype=torch.float64), atol=1e-5)
    assert torch.allclose(base.double(), classes[:, background].sum(dim=1), atol=1e-6)
    conditional = classes[:, served] / classes[:, served].sum(dim=1, keepdim=True)
    assert torch.allclose(probs.double(), conditional, atol=1e-5)
    assert router.predict_proba([]).shape == (0, len(router.names)) and router.base_proba([]).shape == (0,)


@pytest.mark.parametrize("kw", [{}, {"p": 0.9}, {"p": 1.0, "top_k": 2}, {"base_threshold": 0.9}])
def test_route_is_top_p_where_the_router_does_not_abstain(router, split, kw):
    _, (unseen, _) = split
    texts = unseen[::3] + ISSUE_PROMPTS + [unseen[0] + " " + unseen[45]]
    select = {k: v for k, v in kw.items() if k != "base_threshold"}
    ids, weights = top_p_select(router.predict_proba(texts), **select)
    base = router.base_proba(texts) >= kw.get("base_threshold", router.base_threshold)
    assert base.any() and not base.all()
    expected = [
        [] if b else [(router.names[i], w) for i, w in zip(r_ids, r_w) if i >= 0]
        for r_ids, r_w, b in zip(ids.tolist(), weights.tolist(), base.tolist())
    ]
    assert router.route(texts, **kw) == expected
    t_ids, t_weights = router.route_tensors(texts, **kw)
    assert t_ids.shape == ids.shape and torch.equal(t_ids[~base], ids[~base])
    assert (t_ids[base] == -1).all() and (t_weights[base] == 0).all()
    assert torch.equal(t_weights[~base], weights[~base])


def test_route_tensors_when_every_row_abstains_and_when_empty(router):
    ids, weights = router.route_tensors(ISSUE_PROMPTS)
    assert ids.shape == weights.shape and ids.shape[0] == 3 and ids.shape[1] >= 1
    assert (ids == -1).all() and (weights == 0).all()
    ids, weights = router.route_tensors([])
    assert ids.shape == (0, 0) and ids.dtype == torch.int64 and weights.dtype == torch.float32


def test_min_confidence_and_base_threshold_combine(router, split):
    _, (unseen, _) = split
    texts = unseen[:40] + ISSUE_PROMPTS
    top = router.predict_proba(texts).max(dim=1).values
    base = router.base_proba(texts)
    threshold = float(top.median())
    got = router.route(texts, min_confidence=threshold)
    plain = router.route(texts, base_threshold=1.0)
    for t, b, g, q in zip(top.tolist(), base.tolist(), got, plain):
        assert g == ([] if (t < threshold or b >= router.base_threshold) else q)


def test_training_with_adapters_equals_with_adapters_afterwards(split, router):
    (texts, tasks), (unseen, _) = split
    nine = Router.train(texts, tasks, seed=0, **SMALL)  # every task its own adapter
    assert nine.names == sorted(set(tasks)) and nine.background == [GENERAL]
    six = nine.with_adapters(ADAPTERS)
    assert six.net is nine.net and six.classes == router.classes and six.names == router.names
    assert "served" not in six.report and "served" in nine.report
    probe = unseen + ISSUE_PROMPTS
    assert torch.equal(six.predict_proba(probe), router.predict_proba(probe))
    assert torch.equal(six.base_proba(probe), router.base_proba(probe))
    assert six.route(probe, p=0.8) == router.route(probe, p=0.8)


def test_several_classes_map_onto_one_adapter(router, split):
    _, (unseen, truth) = split
    cjk = router.with_adapters({"ja": "cjk", "zh": "cjk", "de": "de", "code": "code"}, base_threshold=0.6)
    assert cjk.names == ["cjk", "code", "de"] and cjk.base_threshold == 0.6
    assert cjk.background == [GENERAL, "es", "fr", "license", "ru", "shell"]
    classes = torch.softmax(router.class_logits(unseen).double(), dim=1)
    col = {c: i for i, c in enumerate(router.classes)}
    mass = torch.stack(
        [classes[:, [col["ja"], col["zh"]]].sum(dim=1), classes[:, col["code"]], classes[:, col["de"]]], dim=1
    )
    assert torch.allclose(cjk.predict_proba(unseen).double(), mass / mass.sum(dim=1, keepdim=True), atol=1e-5)
    chosen = cjk.route(unseen)
    ja_zh = [c[:1] == [("cjk", c[0][1])] if c else False for c, t in zip(chosen, truth) if t in ("ja", "zh")]
    fr = [c == [] for c, t in zip(chosen, truth) if t == "fr"]
    assert sum(ja_zh) / len(ja_zh) >= 0.95 and sum(fr) / len(fr) >= 0.9


def test_save_and_load_keep_the_abstention(router, split, tmp_path):
    _, (unseen, _) = split
    probe = unseen[:50] + ISSUE_PROMPTS
    other = router.with_adapters({"ja": "cjk", "zh": "cjk", "de": "de"}, base_threshold=0.7)
    for r, where in ((router, "a"), (other, "b")):
        r.save(tmp_path / where)
        config = json.loads((tmp_path / where / CONFIG_FILE).read_text(encoding="utf-8"))
        assert config["format_version"] == 2 and config["classes"] == r.classes
        assert config["adapter_of"] == r.adapter_of and config["base_threshold"] == r.base_threshold
        loaded = Router.load(tmp_path / where)
        assert (loaded.names, loaded.background, loaded.base_threshold) == (
            r.names,
            r.background,
            r.base_threshold,
        )
        assert torch.equal(loaded.base_proba(probe), r.base_proba(probe))
        assert torch.equal(loaded.predict_proba(probe), r.predict_proba(probe))
        assert loaded.route(probe) == r.route(probe)


def test_a_format_1_router_loads_without_background_and_can_be_given_one():
    old = Router.load(ROOT / "tests" / "data" / "router_v1")  # names code, de, en; saved before abstention
    assert old.classes == old.names == ["code", "de", "en"] and old.background == [] and not old.can_abstain
    texts = ["The file is removed.", "Die Datei wird gelöscht.", "def f(x): return x"]
    assert torch.equal(old.base_proba(texts), torch.zeros(3))
    assert all(row for row in old.route(texts))  # it never abstains by itself
    served = old.with_adapters(["code", "de"])
    assert served.background == ["en"] and served.names == ["code", "de"]
    expected = (
        torch.softmax(old.class_logits(texts).double(), dim=1)[:, 2] >= served.base_threshold
    ).tolist()
    assert [row == [] for row in served.route(texts)] == expected


@pytest.mark.parametrize(
    "adapters, error, words",
    [
        (["de", "klingon"], ValueError, ["klingon", "not classes"]),
        ({"de": "de", "nope": "x"}, ValueError, ["nope", "not classes"]),
        ({"de": ""}, ValueError, ["adapters['de']", "non-empty str"]),
        ({GENERAL: "de"}, ValueError, [GENERAL, "background"]),
        ([], ValueError, ["no class served"]),
        ({"de": None}, ValueError, ["no class served"]),
        ("de", TypeError, ["adapters must be"]),
    ],
    ids=[
        "unknown-list",
        "unknown-dict",
        "empty-name",
        "general-served",
        "none",
        "all-background",
        "a-string",
    ],
)
def test_bad_adapters_are_named(router, split, adapters, error, words):
    (texts, tasks), _ = split
    with pytest.raises(error) as info:
        router.with_adapters(adapters)
    for word in words:
        assert word in str(info.value), str(info.value)
    with pytest.raises(error):  # before any training work
        Router.train(texts[::50], tasks[::50], adapters=adapters, **SMALL)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"background": "everything"}, ValueError, "background must be 'builtin'"),
        ({"background": ["fine", " "]}, ValueError, r"background\[1\] is empty"),
        ({"background": "builtin", "base_threshold": 0}, ValueError, "base_threshold must be"),
        ({"base_threshold": 1.5}, ValueError, "base_threshold must be"),
    ],
)
def test_bad_training_options(split, kw, error, match):
    (texts, tasks), _ = split
    with pytest.raises(error, match=match):
        Router.train(texts[::50], tasks[::50], **{**SMALL, **kw})


def test_background_options(split):
    (texts, tasks), _ = split
    de_ja = [i for i, t in enumerate(tasks) if t == "de"][:100] + [
        i for i, t in enumerate(tasks) if t == "ja"
    ][:100]
    x, y = [texts[i] for i in de_ja], [tasks[i] for i in de_ja]
    closed = Router.train(x, y, background=None, **SMALL)
    assert closed.classes == ["de", "ja"] and not closed.can_abstain
    own = Router.train(x, y, background=["hello there", "what's up?", "good morning"] * 20, **SMALL)
    assert own.classes == [GENERAL, "de", "ja"] and own.report["per_task"][GENERAL]["count"] >= 1


def test_bad_base_threshold_in_route(router):
    for bad in (0, -0.1, 1.01, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="base_threshold must be"):
            router.route(["hello"], base_threshold=bad)


def test_cli_train_router_with_adapters_and_route(split, tmp_path, capsys):
    (texts, tasks), _ = split
    keep = [i for i, t in enumerate(tasks) if t in ("de", "ja", "shell")][::2]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"text": texts[i], "task": tasks[i]}, ensure_ascii=False) + "\n" for i in keep),
        encoding="utf-8",
    )
    out = tmp_path / "router"
    assert (
        main(["train-router", "--data", str(data), "--out", str(out), "--adapters", "de,ja", "--epochs", "8"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "served at base_threshold 0.3" in printed
    router = Router.load(out)
    assert router.names == ["de", "ja"] and router.background == [GENERAL, "shell"]
    prompts = ["Die Datei wird nicht gelöscht.", *ISSUE_PROMPTS]
    assert main(["route", "--router", str(out), *prompts, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [[(a["name"], a["weight"]) for a in r["adapters"]] for r in rows] == router.route(prompts)
    assert [r["base_proba"] for r in rows] == router.base_proba(prompts).tolist()
    assert rows[0]["adapters"] and all(r["adapters"] == [] for r in rows[1:])
    assert main(["route", "--router", str(out), *ISSUE_PROMPTS[:1]]) == 0
    assert capsys.readouterr().out.strip().endswith(": (base model)")
    assert main(["route", "--router", str(out), "hello", "--base-threshold", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["adapters"] != []
    assert (
        main(
            [
                "train-router",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "r2"),
                "--no-general",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    assert Router.load(tmp_path / "r2").classes == ["de", "ja", "shell"]
    capsys.readouterr()
    assert (
        main(["train-router", "--data", str(data), "--out", str(tmp_path / "r3"), "--adapters", "de,xx"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapters names tasks not in" in err[0] and "xx" in err[0]
    assert main(["route", "--router", str(out), "hello", "--base-threshold", "0"]) == 2
    assert "base_threshold must be" in capsys.readouterr().err
