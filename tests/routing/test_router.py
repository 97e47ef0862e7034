"""top_p_select (hand-computed cases, contract errors, properties), the sentence Router on a slice of the
real text set (accuracy, save/load, determinism, errors) and the train-router / route commands."""

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dlplora_triton as dlp
from dlplora_triton.cli import main
from dlplora_triton.demo.tasks import load_texts
from dlplora_triton.routing import (
    CONFIG_FILE,
    GENERAL,
    WEIGHTS_FILE,
    Router,
    general_prompts,
    top_p_select,
)

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------
# top_p_select: hand-computed cases


def _select(rows, **kw):
    ids, weights = top_p_select(torch.tensor(rows, dtype=torch.float64), **kw)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    return ids.tolist(), weights.double()


@pytest.mark.parametrize(
    "rows, kw, ids",
    [
        ([[0.5, 0.3, 0.2]], {"p": 0.6}, [[0, 1]]),  # 0.5 < 0.6: the second one, which crosses p, is kept
        ([[0.5, 0.3, 0.2]], {"p": 0.5}, [[0]]),  # the mass above the second is 0.5, not < 0.5
        ([[0.5, 0.3, 0.2]], {"p": 0.3}, [[0]]),  # the first is always kept
        ([[0.2, 0.3, 0.5]], {"p": 0.6}, [[2, 1]]),  # descending order, not index order
        ([[0.5, 0.3, 0.2, 0.0]], {"p": 1.0}, [[0, 1, 2]]),  # p = 1: every non-zero adapter
        ([[0.4, 0.35, 0.25]], {"p": 1.0, "top_k": 2}, [[0, 1]]),  # top_k after the cut
        ([[0.4, 0.35, 0.25]], {"p": 0.3, "top_k": 2}, [[0]]),  # top_k never adds
        ([[0.25, 0.25, 0.25, 0.25]], {"p": 0.6}, [[0, 1, 2]]),  # ties: lower index first
        ([[0.2, 0.4, 0.4]], {"p": 0.3}, [[1]]),
        ([[0.2, 0.4, 0.4]], {"p": 0.5}, [[1, 2]]),
        ([[0.0, 1.0, 0.0]], {"p": 1.0}, [[1]]),  # zeros never kept, P = 1
        ([[0.9, 0.1, 0.0], [0.4, 0.3, 0.3]], {"p": 0.95}, [[0, 1, -1], [0, 1, 2]]),  # -1 padding, P = max
        ([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], {"p": 1.0}, [[2, -1], [0, 1]]),
    ],
    ids=[
        "crossing",
        "exact-p-stops",
        "first-always",
        "descending",
        "p=1",
        "top_k",
        "top_k-after-cut",
        "ties",
        "tie-behind",
        "tie-pair",
        "zeros",
        "padding",
        "padding-2",
    ],
)
def test_hand_computed_ids(rows, kw, ids):
    got, weights = _select(rows, **kw)
    assert got == ids
    kept = torch.tensor(got) >= 0
    assert torch.all(weights[~kept] == 0)
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(rows), dtype=torch.float64), atol=1e-6)


def test_renorm_and_softmax_weights():
    _, renorm = _select([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], p=0.6)
    assert torch.allclose(
        renorm, torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [1.0, 0.0]], dtype=torch.float64), atol=1e-7
    )
    ids, soft = _select([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], p=0.6, weighting="softmax")
    e5, e3 = math.exp(0.5), math.exp(0.3)
    assert ids == [[0, 1], [2, -1]]
    assert torch.allclose(
        soft, torch.tensor([[e5 / (e5 + e3), e3 / (e5 + e3)], [1.0, 0.0]], dtype=torch.float64), atol=1e-7
    )


def test_dtypes_devices_and_empty_batch():
    ids, weights = top_p_select(torch.tensor([[0.5, 0.5]], dtype=torch.float16), p=0.6)
    assert ids.tolist() == [[0, 1]] and weights.dtype == torch.float32
    ids, weights = top_p_select(torch.empty(0, 4))
    assert ids.shape == (0, 0) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    # Feeds fused_lora directly: ids int64 with -1 slots, float32 weights.
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.1, 0.9]])
    ids, weights = top_p_select(probs, p=0.6)
    x, a, b = torch.randn(3, 8), torch.randn(3, 2, 8), torch.randn(3, 4, 2)
    out = dlp.fused_lora(x, a, b, torch.tensor([0, 1, 3]), ids, weights)
    assert out.shape == (3, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "probs, kw, error, match",
    [
        ([[0.5, 0.5]], {"p": 0.0}, ValueError, r"p must be a number in \(0, 1\]"),
        ([[0.5, 0.5]], {"p": 1.5}, ValueError, "p must be"),
        ([[0.5, 0.5]], {"p": float("nan")}, ValueError, "p must be"),
        ([[0.5, 0.5]], {"p": -0.1}, ValueError, "p must be"),
        ([[1.5, -0.5]], {}, ValueError, "non-negative"),
        ([[float("nan"), 1.0]], {}, ValueError, "finite"),
        ([[float("inf"), 0.0]], {}, ValueError, "finite"),
        ([0.5, 0.5], {}, ValueError, r"shape \[B, L\]"),
        ([[[0.5, 0.5]]], {}, ValueError, r"shape \[B, L\]"),
        ([[0.2, 0.2]], {}, ValueError, "row 0 sums to 0.4"),
        ([[0.5, 0.5], [2.0, 3.0]], {}, ValueError, "row 1 sums to 5"),
        ([[0.5, 0.5]], {"top_k": 0}, ValueError, "top_k must be None or an integer >= 1"),
        ([[0.5, 0.5]], {"top_k": 1.5}, ValueError, "top_k"),
        ([[0.5, 0.5]], {"weighting": "linear"}, ValueError, "weighting must be one of"),
    ],
)
def test_contract_errors(probs, kw, error, match):
    with pytest.raises(error, match=match):
        top_p_select(torch.tensor(probs), **kw)


def test_type_errors():
    with pytest.raises(ValueError, match=r"L >= 1"):
        top_p_select(torch.empty(2, 0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        top_p_select([[0.5, 0.5]])
    with pytest.raises(TypeError, match="floating-point"):
        top_p_select(torch.tensor([[1, 0]]))


# ---------------------------------------------------------------------------------------------------
# top_p_select: properties against the plain loop of its docstring


def _reference(row: list[float], p: float, top_k: int | None) -> list[int]:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    kept, above = [], 0.0
    for j in order:
        if above >= p or row[j] == 0 or len(kept) == top_k:
            break
        kept.append(j)
        above += row[j]
    return kept


# Small integer weights make ties and zeros common; at least one positive entry per row.
_rows = st.lists(st.integers(0, 4), min_size=1, max_size=7).filter(any)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_rows, min_size=1, max_size=6),
    st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.25, 0.5, 0.6, 0.75, 1.0])),
    st.one_of(st.none(), st.integers(1, 4)),
    st.sampled_from(["renorm", "softmax"]),
)
def test_properties(rows, p, top_k, weighting):
    width = max(len(r) for r in rows)
    probs = torch.zeros(len(rows), width, dtype=torch.float64)  # shorter rows padded with zeros
    for i, r in enumerate(rows):
        probs[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    probs /= probs.sum(dim=1, keepdim=True)
    ids, weights = top_p_select(probs, p=p, top_k=top_k, weighting=weighting)
    expected = [_reference(row, p, top_k) for row in probs.tolist()]
    assert ids.shape[1] == max(len(e) for e in expected)  # P = the largest number kept
    for row_ids, row_w, exp, row_p in zip(ids.tolist(), weights.tolist(), expected, probs.tolist()):
        kept = [i for i in row_ids if i >= 0]
        assert kept == exp and len(kept) >= 1  # a prefix of the stable descending order, at least one
        assert row_ids[len(kept) :] == [-1] * (len(row_ids) - len(kept))  # -1 only after the kept ones
        assert all(w == 0 for w in row_w[len(kept) :]) and all(w > 0 for w in row_w[: len(kept)])
        assert all(row_p[i] > 0 for i in kept)
        assert math.isclose(sum(row_w), 1.0, rel_tol=1e-6)
        if weighting == "renorm":
            total = sum(row_p[i] for i in kept)
            assert all(math.isclose(w, row_p[i] / total, rel_tol=1e-5) for i, w in zip(kept, row_w))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_rows, min_size=1, max_size=6),
    st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.25, 0.5, 0.6, 0.75, 1.0])),
    st.one_of(st.none(), st.integers(1, 4)),
    st.integers(0, 2**32 - 1),
)
def test_loops_equal_tensor_ops(rows, p, top_k, seed):
    """Small batches are selected by Python loops, large ones by tensor ops: the same bits."""
    from dlplora_triton.routing.top_p import _select_loops, _select_tensors

    width = max(len(r) for r in rows)
    probs = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, r in enumerate(rows):
        probs[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    # ties and zeros from the integers, and rows of softmax-like values with every bit in use
    noisy = torch.softmax(torch.randn(len(rows), width, generator=torch.Generator().manual_seed(seed)), 1)
    for batch in (probs / probs.sum(dim=1, keepdim=True), noisy.double()):
        loops, tensors = _select_loops(batch, p, top_k), _select_tensors(batch, p, top_k, "renorm")
        assert torch.equal(loops[0], tensors[0]) and torch.equal(loops[1], tensors[1])


# ---------------------------------------------------------------------------------------------------
# Router on a slice of the real text set

# Small settings so that every training in this file takes about a second.
SMALL = {"num_buckets": 2**14, "hidden": (64,), "epochs": 12, "batch_size": 64}


@pytest.fixture(scope="module")
def split():
    texts, tasks = load_texts()  # the text set's first version: 9 tasks (the full set: test_router_texts.py)
    per_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        per_task.setdefault(t, []).append(i)
    train = [i for idx in per_task.values() for i in idx[:100]]
    unseen = [i for idx in per_task.values() for i in idx[100:130]]
    return ([texts[i] for i in train], [tasks[i] for i in train]), (
        [texts[i] for i in unseen],
        [tasks[i] for i in unseen],
    )


@pytest.fixture(scope="module")
def router(split):
    (texts, tasks), _ = split
    return Router.train(texts, tasks, seed=0, **SMALL)


def test_trains_to_high_accuracy(router, split):
    _, (unseen, truth) = split
    assert router.names == sorted(set(truth)) and len(router.names) >= 6
    report = router.report
    assert report["heldout_accuracy"] >= 0.9, report
    assert report["train_seconds"] >= 0 and report["epochs_run"] >= report["best_epoch"] >= 1  # recorded
    predicted = router.predict_proba(unseen).argmax(dim=1).tolist()
    accuracy = sum(router.names[i] == t for i, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= 0.9
    # The classes are the tasks and the general prompts Router.train adds by default (background).
    assert router.classes == sorted([*router.names, GENERAL]) and router.background == [GENERAL]
    assert set(report["per_task"]) == set(router.classes)
    assert report["num_train"] + report["num_heldout"] == 100 * len(router.names) + len(general_prompts())
    for pair in report["confused_pairs"]:
        assert pair["true"] != pair["predicted"] and pair["count"] >= 1


def test_default_size_is_about_5m():
    # Constructing the default-size net does not need training: count its parameters.
    r = Router(
        ["a", "b"],
        {
            "source": "hash",
            "num_buckets": 2**18,
            "embed_dim": 16,
            "char_ngrams": [2, 4],
            "word_ngrams": 2,
            "max_chars": 2048,
        },
        {"hidden": [256, 256], "dropout": 0.1},
    )
    assert 4_000_000 < r.num_parameters < 6_000_000


def test_predict_proba_rows_sum_to_one(router, split):
    _, (unseen, _) = split
    probs = router.predict_proba(unseen[:50] + ["x", "日本語", "Ελληνικά κείμενα", "🙂 emoji only 🙂"])
    assert probs.shape == (54, len(router.names)) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(54), atol=1e-5)
    assert router.predict_proba([]).shape == (0, len(router.names))


@pytest.mark.parametrize("kw", [{}, {"p": 0.9}, {"p": 1.0, "top_k": 2}, {"p": 0.3, "weighting": "softmax"}])
def test_route_equals_top_p_select(router, split, kw):
    _, (unseen, _) = split
    texts = unseen[:40] + [unseen[0] + " " + unseen[-1]]  # two tasks in one prompt
    ids, weights = top_p_select(router.predict_proba(texts), **kw)
    base = (router.base_proba(texts) >= router.base_threshold).tolist()
    expected = [
        [] if to_base else [(router.names[i], w) for i, w in zip(r_ids, r_w) if i >= 0]
        for r_ids, r_w, to_base in zip(ids.tolist(), weights.tolist(), base)
    ]
    assert router.route(texts, **kw) == expected
    # route_tensors is the same decision as tensors: a row of -1 ids / 0 weights is the base model
    t_ids, t_weights = router.route_tensors(texts, **kw)
    assert [[router.names[i] for i in row if i >= 0] for row in t_ids.tolist()] == [
        [name for name, _ in row] for row in expected
    ]
    assert all((t_weights[b] == 0).all() for b, to_base in enumerate(base) if to_base)


def test_min_confidence_gives_base_model(router, split):
    _, (unseen, _) = split
    texts = unseen[:60] + [unseen[0] + " " + unseen[-1]]
    top = router.predict_proba(texts).max(dim=1).values
    threshold = float(top.median())
    plain, gated = router.route(texts), router.route(texts, min_confidence=threshold)
    assert any(g == [] for g in gated) and any(g != [] for g in gated)
    for t, g, q in zip(top.tolist(), gated, plain):
        assert g == ([] if t < threshold else q)
    with pytest.raises(ValueError, match="min_confidence"):
        router.route(texts, min_confidence=1.5)


def test_save_load_identical_in_this_and_a_fresh_process(router, split, tmp_path):
    _, (unseen, _) = split
    router.save(tmp_path / "r")
    assert (tmp_path / "r" / CONFIG_FILE).is_file() and (tmp_path / "r" / WEIGHTS_FILE).is_file()
    loaded = Router.load(tmp_path / "r")
    assert loaded.names == router.names and loaded.features == router.features
    assert loaded.report["heldout_accuracy"] == router.report["heldout_accuracy"]
    probs = router.predict_proba(unseen)
    assert torch.equal(loaded.predict_proba(unseen), probs)
    (tmp_path / "texts.json").write_text(json.dumps(unseen), encoding="utf-8")
    # Another process, another thread count, another hash seed: the same probabilities, bit for bit.
    code = (
        "import json, sys, torch; torch.set_num_threads(2); from dlplora_triton import Router; "
        "r = Router.load(sys.argv[1]); texts = json.load(open(sys.argv[2], encoding='utf-8')); "
        "torch.save(r.predict_proba(texts), sys.argv[3])"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "r"),
            str(tmp_path / "texts.json"),
            str(tmp_path / "p.pt"),
        ],
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "123"},
    )
    assert torch.equal(torch.load(tmp_path / "p.pt"), probs)


def test_same_seed_same_router_bit_for_bit(split):
    (texts, tasks), _ = split
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = Router.train(texts[:400], tasks[:400], seed=3, **SMALL)
    b = Router.train(texts[:400], tasks[:400], seed=3, **SMALL)
    c = Router.train(texts[:400], tasks[:400], seed=4, **SMALL)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # Training leaves the caller's RNG and thread count as they were.
    assert torch.equal(torch.get_rng_state(), rng_state) and torch.get_num_threads() == threads


def test_balanced_sampling_and_uneven_tasks(split):
    (texts, tasks), _ = split
    # 100 "ja" against 10 "de": both balancing modes still learn the small task.
    keep = [i for i, t in enumerate(tasks) if t == "ja"] + [i for i, t in enumerate(tasks) if t == "de"][:10]
    for balance in ("weight", "sample"):
        r = Router.train(
            [texts[i] for i in keep], [tasks[i] for i in keep], balance=balance, background=None, **SMALL
        )
        assert r.names == ["de", "ja"] and r.report["per_task"]["de"]["count"] == 1
        assert [
            row[0][0] for row in r.route(["Die Datei wird nicht gelöscht.", "ファイルは削除されません。"])
        ] == ["de", "ja"]


@pytest.mark.parametrize(
    "texts, tasks, error, match",
    [
        (["eins zwei drei", "un deux trois"], ["de", "de"], ValueError, "at least two distinct tasks"),
        (["eins zwei drei", ""], ["de", "fr"], ValueError, r"texts\[1\] is empty"),
        (["eins zwei drei", "   \n"], ["de", "fr"], ValueError, r"texts\[1\] is empty or blank"),
        (["eins zwei drei", "un deux trois"], ["de"], ValueError, "same length"),
        (["eins zwei drei"], ["de", "fr"], ValueError, "same length"),
        (["eins zwei drei", "un deux trois"], ["de", ""], ValueError, r"tasks\[1\]"),
        (["eins zwei drei", 3], ["de", "fr"], TypeError, r"texts\[1\] must be a str"),
        ("eins zwei drei", ["de", "fr"], TypeError, "texts must be a list of str"),
    ],
)
def test_train_errors(texts, tasks, error, match):
    with pytest.raises(error, match=match):
        Router.train(texts, tasks, **SMALL)


def test_predict_errors(router):
    with pytest.raises(TypeError, match="list of str"):
        router.predict_proba("a single string")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        router.route(["fine", ""])
    with pytest.raises(ValueError, match="p must be"):
        router.route(["fine"], p=0)


def _edit_config(change):
    def edit(saved: Path):
        config = json.loads((saved / CONFIG_FILE).read_text())
        change(config)
        (saved / CONFIG_FILE).write_text(json.dumps(config))

    return edit


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(config):
        for k in keys[:-1]:
            config = config[k]
        if value is _DELETE:
            del config[keys[-1]]
        else:
            config[keys[-1]] = value(config[keys[-1]]) if callable(value) else value

    return change


_DELETE = object()


def _write(name: str, data: bytes):
    return lambda saved: (saved / name).write_bytes(data)


def _cut(name: str, keep):
    return lambda saved: (saved / name).write_bytes(
        (saved / name).read_bytes()[: keep((saved / name).stat().st_size)]
    )


def _nan_weights(saved: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / WEIGHTS_FILE))
    state["norm.weight"][0] = float("nan")
    save_file(state, str(saved / WEIGHTS_FILE))


def _drop_class(config):
    """Drop the last adapter class from classes, adapter_of and names: a consistent config, one row short."""
    last = config["names"][-1]
    config["classes"].remove(last)
    del config["adapter_of"][last]
    config["names"].remove(last)


C, W = CONFIG_FILE, WEIGHTS_FILE
# (case id, how to break the saved router, expected exception, words in the message)
ROUTER_CASES = [
    ("no-directory", lambda saved: shutil.rmtree(saved), FileNotFoundError, ["does not exist"]),
    ("no-config", lambda saved: (saved / C).unlink(), FileNotFoundError, [C, "not found"]),
    ("no-weights", lambda saved: (saved / W).unlink(), FileNotFoundError, [W, "not found"]),
    ("config-empty", _write(C, b""), ValueError, [C, "empty"]),
    ("config-not-json", _write(C, b"{not json"), ValueError, [C, "not valid JSON"]),
    ("config-truncated", _cut(C, lambda n: n // 2), ValueError, [C, "JSON"]),
    ("config-not-utf8", _write(C, b"\xff\xfe{}"), ValueError, [C, "UTF-8"]),
    ("config-a-list", _write(C, b"[]"), ValueError, [C, "JSON object"]),
    ("not-a-router", _write(C, b'{"something": "else"}'), ValueError, [C, "not a dlplora router config"]),
    ("format-version", _edit_config(_set("format_version", 99)), ValueError, [C, "format_version 99"]),
    ("features-empty", _edit_config(_set("features", {})), ValueError, [C, "features.char_ngrams"]),
    ("features-a-list", _edit_config(_set("features", [])), ValueError, [C, "features"]),
    ("buckets-a-string", _edit_config(_set("features", "num_buckets", "4")), ValueError, [C, "num_buckets"]),
    ("buckets-negative", _edit_config(_set("features", "num_buckets", -4)), ValueError, [C, "num_buckets"]),
    ("buckets-float", _edit_config(_set("features", "num_buckets", 16384.0)), ValueError, [C, "num_buckets"]),
    (
        "buckets-vs-weights",
        _edit_config(_set("features", "num_buckets", 2**40)),
        ValueError,
        [W, C, "embedding.weight"],
    ),
    (
        "embed-vs-weights",
        _edit_config(_set("features", "embed_dim", 8)),
        ValueError,
        [W, C, "does not match"],
    ),
    ("unknown-source", _edit_config(_set("features", "source", "magic")), ValueError, [C, "source"]),
    ("char-ngrams", _edit_config(_set("features", "char_ngrams", [4, 2])), ValueError, [C, "char_ngrams"]),
    ("shape-ngrams", _edit_config(_set("features", "shape_ngrams", [3, 1])), ValueError, [C, "shape_ngrams"]),
    ("names-missing", _edit_config(_set("names", _DELETE)), ValueError, [C, "names"]),
    ("names-one", _edit_config(_set("names", ["a"])), ValueError, [C, "names"]),
    ("names-repeated", _edit_config(_set("names", lambda n: [n[0]] * len(n))), ValueError, [C, "names"]),
    ("names-not-str", _edit_config(_set("names", lambda n: [1] + n[1:])), ValueError, [C, "names"]),
    (
        "classes-vs-weights",
        _edit_config(_drop_class),
        ValueError,
        [W, C, "does not match", "mlp.3"],
    ),
    ("classes-missing", _edit_config(_set("classes", _DELETE)), ValueError, [C, "classes"]),
    ("classes-one", _edit_config(_set("classes", ["de"])), ValueError, [C, "classes"]),
    ("adapter-of-missing", _edit_config(_set("adapter_of", _DELETE)), ValueError, [C, "adapter_of"]),
    (
        "adapter-of-a-class-short",
        _edit_config(_set("adapter_of", "de", _DELETE)),
        ValueError,
        [C, "adapter_of"],
    ),
    ("adapter-of-empty-name", _edit_config(_set("adapter_of", "de", "")), ValueError, [C, "adapter_of"]),
    (
        "general-served",
        _edit_config(_set("adapter_of", GENERAL, "de")),
        ValueError,
        [C, "adapter_of", GENERAL],
    ),
    ("names-vs-adapter-of", _edit_config(_set("names", lambda n: n[:-1])), ValueError, [C, "names"]),
    ("threshold-zero", _edit_config(_set("base_threshold", 0)), ValueError, [C, "base_threshold"]),
    ("threshold-string", _edit_config(_set("base_threshold", "0.5")), ValueError, [C, "base_threshold"]),
    ("threshold-missing", _edit_config(_set("base_threshold", _DELETE)), ValueError, [C, "base_threshold"]),
    ("hidden-vs-weights", _edit_config(_set("mlp", "hidden", [32])), ValueError, [W, "does not match"]),
    ("hidden-bad", _edit_config(_set("mlp", "hidden", [0])), ValueError, [C, "mlp.hidden"]),
    ("dropout-bad", _edit_config(_set("mlp", "dropout", 1.5)), ValueError, [C, "mlp.dropout"]),
    ("report-a-list", _edit_config(_set("report", [1])), ValueError, [C, "report"]),
    ("weights-empty", _write(W, b""), ValueError, [W, "empty"]),
    ("weights-garbage", _write(W, b"\x00" * 50), ValueError, [W, "not a readable safetensors file"]),
    ("weights-truncated", _cut(W, lambda n: n - 100), ValueError, [W, "truncated or corrupt"]),
    ("weights-not-finite", _nan_weights, ValueError, [W, "norm.weight", "not finite"]),
]


@pytest.mark.parametrize("case, breakage, error, words", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
def test_broken_router_is_named_before_anything_is_built(
    case, breakage, error, words, router, tmp_path, monkeypatch
):
    saved = router.save(tmp_path / "r")
    breakage(saved)
    built = []
    monkeypatch.setattr(Router, "__init__", lambda self, *a, **k: built.append(a))
    with pytest.raises(error) as info:
        Router.load(saved)
    assert not built  # raised before a net (4M parameters, or 2^40 rows) was allocated
    for word in words:
        assert word in str(info.value), (case, str(info.value))


def test_save_into_a_file_raises(router, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        router.save(tmp_path / "file")


def test_router_saved_by_an_earlier_version_loads_with_identical_probabilities():
    # tests/data/router_v1: saved by dlplora_triton/router.py before the routing/ split (format_version 1).
    expected = json.loads((ROOT / "tests" / "data" / "router_v1_probs.json").read_text(encoding="utf-8"))
    router = Router.load(ROOT / "tests" / "data" / "router_v1")
    assert router.names == expected["names"]
    assert torch.equal(router.predict_proba(expected["texts"]), torch.tensor(expected["probs"]))


@pytest.mark.parametrize("hidden", [(), (7,), (5, 3)])
@pytest.mark.parametrize(
    "inputs", [{"num_buckets": 11, "embed_dim": 4}, {"input_dim": 6}], ids=["hash", "model"]
)
def test_state_shapes_match_the_built_net(hidden, inputs):
    from dlplora_triton.routing.net import RouterNet

    net = RouterNet(3, list(hidden), 0.1, **inputs)
    assert RouterNet.state_shapes(3, list(hidden), inputs) == {
        k: list(v.shape) for k, v in net.state_dict().items()
    }


# ---------------------------------------------------------------------------------------------------
# the second feature source: pooled hidden states of a transformers model


@pytest.fixture(scope="module")
def encoder(split):
    from dlplora_triton.demo.toy_model import build_llama, build_tokenizer

    (texts, _), _ = split
    tokenizer = build_tokenizer(texts, vocab_size=400)
    return build_llama(len(tokenizer), hidden=32, intermediate=64, layers=1, heads=2, seed=0), tokenizer


def test_model_features(split, encoder, tmp_path):
    (texts, tasks), (unseen, truth) = split
    model, tokenizer = encoder
    keep = [i for i, t in enumerate(tasks) if t in ("code", "ja", "ru")]
    router = Router.train(
        [texts[i] for i in keep],
        [tasks[i] for i in keep],
        features="model",
        model=model,
        tokenizer=tokenizer,
        hidden=(64,),
        epochs=15,
        lr=1e-2,
    )
    assert (
        router.source == "model"
        and router.features["hidden_size"] == 32
        and router.names == ["code", "ja", "ru"]
    )
    # A random-weight model, but its hidden states still carry the tokens: scripts and code separate.
    assert router.report["heldout_accuracy"] >= 0.8, router.report
    probe = [u for u, t in zip(unseen, truth) if t in router.names][:20]
    probs = router.predict_proba(probe)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(probe)), atol=1e-5)
    # Right padding: a text's probabilities do not depend on the other texts of its batch.
    assert torch.allclose(router.predict_proba(probe[:1]), probs[:1], atol=1e-5)
    ids, weights = top_p_select(probs, p=0.9)
    base = (router.base_proba(probe) >= router.base_threshold).tolist()
    assert router.route(probe, p=0.9) == [
        [] if to_base else [(router.names[i], w) for i, w in zip(r_ids, r_w) if i >= 0]
        for r_ids, r_w, to_base in zip(ids.tolist(), weights.tolist(), base)
    ]
    router.save(tmp_path / "r")
    assert torch.equal(
        Router.load(tmp_path / "r", model=model, tokenizer=tokenizer).predict_proba(probe), probs
    )
    with pytest.raises(ValueError, match="pass model= and tokenizer="):
        Router.load(tmp_path / "r")
    with pytest.raises(ValueError, match="needs model="):
        Router.train(texts[:4], ["a", "b", "a", "b"], features="model")
    from dlplora_triton.demo.toy_model import build_llama

    other = build_llama(len(tokenizer), hidden=16, intermediate=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="hidden states of size 16"):
        Router.load(tmp_path / "r", model=other, tokenizer=tokenizer).predict_proba(probe)


# ---------------------------------------------------------------------------------------------------
# the dlplora train-router / route commands


def _write_jsonl(path: Path, texts, tasks) -> Path:
    path.write_text(
        "".join(json.dumps({"text": x, "task": t}, ensure_ascii=False) + "\n" for x, t in zip(texts, tasks)),
        encoding="utf-8",
    )
    return path


def test_cli_train_and_route(split, tmp_path, capsys):
    (texts, tasks), (unseen, truth) = split
    data = _write_jsonl(tmp_path / "train.jsonl", texts[:500], tasks[:500])
    assert (
        main(["train-router", "--data", str(data), "--out", str(tmp_path / "router"), "--epochs", "6"]) == 0
    )
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "per task:" in printed and "most confused" in printed
    assert (tmp_path / "router" / WEIGHTS_FILE).is_file()

    # two unseen texts of two tasks the router was trained on (the first 500 texts hold no zh: a zh text
    # may rightly go to the base model)
    trained = set(tasks[:500])
    prompts = [unseen[0], [u for u, t in zip(unseen, truth) if t in trained and t != truth[0]][-1]]
    assert main(["route", "--router", str(tmp_path / "router"), *prompts, "--json", "--p", "0.9"]) == 0
    rows = json.loads(capsys.readouterr().out)
    router = Router.load(tmp_path / "router")
    assert [r["prompt"] for r in rows] == prompts
    assert [[(a["name"], a["weight"]) for a in r["adapters"]] for r in rows] == router.route(prompts, p=0.9)

    assert main(["route", "--router", str(tmp_path / "router"), *prompts, "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith(" 1.000") for line in lines)
    mixed = prompts[0] + " " + prompts[1]  # two tasks in one prompt: no probability of exactly 1
    top = float(router.predict_proba([mixed]).max())
    assert top < 0.999
    assert (
        main(["route", "--router", str(tmp_path / "router"), mixed, "--min-confidence", str(top + 1e-4)]) == 0
    )
    assert capsys.readouterr().out.strip().endswith(": (base model)")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train-router", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/r"],
            "missing.jsonl' does not exist",
        ),
        (["train-router", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r"], "bad.jsonl:2: not valid JSON"),
        (
            ["train-router", "--data", "{tmp}/wrong.jsonl", "--out", "{tmp}/r"],
            "wrong.jsonl:1: the object has no 'task'",
        ),
        (["train-router", "--data", "{tmp}/one.jsonl", "--out", "{tmp}/r"], "at least two distinct tasks"),
        (["route", "--router", "{tmp}/nowhere", "hello"], "does not exist"),
        (["route", "--router", "{tmp}", "hello"], "router_config.json' not found"),
    ],
    ids=["missing-data", "bad-json", "wrong-fields", "one-task", "missing-router", "not-a-router"],
)
def test_cli_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c", "task": "x"}\n{oops\n')
    (tmp_path / "wrong.jsonl").write_text('{"text": "a b c", "label": "x"}\n')
    _write_jsonl(tmp_path / "one.jsonl", ["eins zwei", "drei vier"], ["de", "de"])
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_route_bad_p_exits_2(router, tmp_path, capsys):
    router.save(tmp_path / "r")
    assert main(["route", "--router", str(tmp_path / "r"), "hello", "--p", "1.5"]) == 2
    assert "p must be a number in (0, 1]" in capsys.readouterr().err


def test_cli_help_of_the_router_commands():
    for argv in (["train-router", "--help"], ["route", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0


def test_the_old_select_module_still_imports_with_a_warning():
    sys.modules.pop("dlplora_triton.routing.select", None)
    with pytest.warns(DeprecationWarning, match="routing.select is deprecated"):
        module = importlib.import_module("dlplora_triton.routing.select")
    assert module.top_p_select is dlp.top_p_select and module.DEFAULT_P == dlp.routing.DEFAULT_P
