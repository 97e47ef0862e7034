"""Short prompts: shape n-grams (features.text_shape) and short crops of the training texts (augment.py).

What they do to routing by prompt length is measured by bench/bench_router_lengths.py (docs/routing.md,
"Short prompts"); these tests check the functions' contracts and how training and loading use them.
"""

from __future__ import annotations

import pytest
import torch

from dlplora_triton.demo.tasks import TEXTS_PATH
from dlplora_triton.routing import Router, read_labelled_jsonl
from dlplora_triton.routing.augment import crop_units, main_script, short_crops
from dlplora_triton.routing.features import featurize, text_shape

SMALL = {"num_buckets": 2**14, "hidden": (64,), "epochs": 6, "batch_size": 64}


@pytest.mark.parametrize(
    "text, shape",
    [
        ("def fib(n):", "a a(a):"),
        ("self.x = fib(n + 1)", "a.a = a(a + 0)"),
        ("Die Datei wird nicht gelöscht.", "a a a a a."),
        ("привет, как дела?", "c, c c?"),
        ("パスワードの後に、コンマ", "khHh、k"),
        ("使用者目錄 /etc/login.defs 2024", "H /a/a.a 0"),
        ("Ωμέγα 3.14", "g 0.0"),
        ("", ""),
    ],
)
def test_text_shape(text, shape):
    assert text_shape(text) == shape


BASE_FEATURES = {"num_buckets": 2**14, "char_ngrams": [2, 4], "word_ngrams": 2, "max_chars": 2048}


def test_shape_ngrams_add_features_and_their_absence_changes_nothing():
    texts = ["def fib(n):", "Die Datei wird nicht gelöscht.", "x"]
    plain_i, plain_o = featurize(texts, BASE_FEATURES)
    none_i, none_o = featurize(texts, {**BASE_FEATURES, "shape_ngrams": None})
    assert torch.equal(plain_i, none_i) and torch.equal(plain_o, none_o)  # routers saved before shapes
    shaped_i, shaped_o = featurize(texts, {**BASE_FEATURES, "shape_ngrams": [2, 4]})
    counts = torch.diff(shaped_o, append=torch.tensor([shaped_i.numel()]))
    plain_counts = torch.diff(plain_o, append=torch.tensor([plain_i.numel()]))
    assert (counts > plain_counts).all()
    # each text keeps its own features first, then its shape's: the plain ones are a prefix of its bag
    for b in range(len(texts)):
        start, n = int(plain_o[b]), int(plain_counts[b])
        assert torch.equal(shaped_i[int(shaped_o[b]) : int(shaped_o[b]) + n], plain_i[start : start + n])


def test_crop_units_and_main_script():
    text = "不建立目錄 /etc/login.defs 系統"
    assert [text[a:b] for a, b in crop_units(text)] == [*"不建立目錄", "/etc/login.defs", "系", "統"]
    assert main_script(text) == "LATIN"  # 12 Latin letters against 7 CJK characters
    assert main_script("不建立使用者目錄，即使 /etc/login.defs 系統檔設定") == "CJK"
    assert main_script("Использовать --help для справки") == "CYRILLIC"
    assert main_script("self._root_seen = True") == "LATIN"
    assert main_script("123 + 4") is None


def test_short_crops():
    texts = [
        "不建立使用者目錄，即使 /etc/login.defs 系統檔設定要建立使用者目錄。",
        "Die Datei -a wird nicht gelöscht, wenn sie noch geöffnet ist.",
        "self._root_seen = True",
        "single",
        "Использовать --help для справки",
    ]
    crops, sources = short_crops(texts, per_text=20, max_units=3, seed=5)
    assert (crops, sources) == short_crops(texts, per_text=20, max_units=3, seed=5)
    assert crops != short_crops(texts, per_text=20, max_units=3, seed=6)[0]
    assert 3 not in sources  # a text of one unit is short already
    assert all(sources.count(i) <= 20 for i in range(len(texts)))
    for crop, source in zip(crops, sources):
        text = texts[source]
        assert crop in text and crop == crop.strip()
        assert 1 <= len(crop_units(crop)) <= 3
        # a letter of the text's main script: never the Latin option alone of a Chinese sentence
        assert main_script(text) in {main_script(ch) for ch in crop if ch.isalpha()}
    assert short_crops(texts, per_text=0, max_units=3, seed=5) == ([], [])


@pytest.fixture(scope="module")
def slice_of_text_set():
    texts, tasks = read_labelled_jsonl(TEXTS_PATH)
    keep = [i for i, t in enumerate(tasks) if t in ("code", "de", "zh")][:450]
    return [texts[i] for i in keep], [tasks[i] for i in keep]


def test_training_with_crops_and_shapes(slice_of_text_set, tmp_path):
    texts, tasks = slice_of_text_set
    plain = Router.train(texts, tasks, seed=0, short_crops=0, shape_ngrams=None, **SMALL)
    shaped = Router.train(texts, tasks, seed=0, short_crops=2, shape_ngrams=(2, 4), **SMALL)
    assert plain.report["num_crops"] == 0 and "shape_ngrams" not in plain.features
    assert shaped.features["shape_ngrams"] == [2, 4]
    # crops come from the training texts only: the held-out split and its size stay the same
    assert shaped.report["num_heldout"] == plain.report["num_heldout"]
    assert shaped.report["num_train"] == plain.report["num_train"] + shaped.report["num_crops"]
    assert plain.report["num_train"] < shaped.report["num_crops"] <= 2 * plain.report["num_train"]
    shaped.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert loaded.features["shape_ngrams"] == [2, 4]
    probe = ["def fib(n):", "Die Datei wird nicht gelöscht.", "不建立使用者目錄"]
    assert torch.equal(loaded.predict_proba(probe), shaped.predict_proba(probe))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"shape_ngrams": (3, 1)}, "shape_ngrams must be None or"),
        ({"shape_ngrams": (0, 2)}, "shape_ngrams must be None or"),
        ({"shape_ngrams": "2-4"}, "shape_ngrams must be None or"),
        ({"short_crops": -1}, "short_crops must be an integer"),
        ({"short_crops": 1.5}, "short_crops must be an integer"),
        ({"crop_max_units": 0}, "crop_max_units must be an integer"),
    ],
)
def test_option_errors(options, match):
    with pytest.raises(ValueError, match=match):
        Router.train(["eins zwei drei", "un deux trois"], ["de", "fr"], **options, **SMALL)
