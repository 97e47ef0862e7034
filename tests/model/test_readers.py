"""Broken input, reader by reader: every missing, empty, truncated, garbage or inconsistent file raises
FileNotFoundError / ValueError naming the file and its owner, and leaves the model as it was.

One table per reader: (case id, how to break the file, expected exception, words the message holds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft_helpers import make_model, save_adapter
from safetensors.torch import load_file, save_file

import dlplora_triton as dlp
from dlplora_triton.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from dlplora_triton.readers import read_json_object, read_labelled_jsonl, read_safetensors, read_torch_state

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------------------------ file surgery
def _edit_config(**changes):
    def edit(d: Path):
        config = json.loads((d / CONFIG_NAME).read_text())
        config.update(changes)
        (d / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _truncate(name: str, keep):
    def edit(d: Path):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: keep(len(data))])

    return edit


def _delete(name: str):
    return lambda d: (d / name).unlink()


def _edit_tensors(change):
    def edit(d: Path):
        state = load_file(str(d / WEIGHTS_NAME))
        change(state)
        save_file(state, str(d / WEIGHTS_NAME))

    return edit


def _set(key, value):
    def change(state):
        state[key] = value(state[key]) if callable(value) else value

    return change


def _pop(key):
    return lambda state: state.pop(key)


def _drop_q0(state):
    del state[f"{Q0}.lora_A.weight"], state[f"{Q0}.lora_B.weight"]


def _add_unknown_module(state):
    state["base_model.model.model.nothing.lora_A.weight"] = torch.ones(2, 32)
    state["base_model.model.model.nothing.lora_B.weight"] = torch.ones(32, 2)


def _nan(state):
    state[f"{Q0}.lora_B.weight"][0, 0] = float("nan")


W = WEIGHTS_NAME
ADAPTER_CASES = [
    ("no-directory", lambda d: shutil.rmtree(d), FileNotFoundError, ["no such directory"]),
    ("no-config", _delete(CONFIG_NAME), FileNotFoundError, [CONFIG_NAME]),
    ("config-empty", _write(CONFIG_NAME, b""), ValueError, [CONFIG_NAME, "empty"]),
    ("config-not-utf8", _write(CONFIG_NAME, b"\xff\xfe\x00garbage"), ValueError, [CONFIG_NAME, "UTF-8"]),
    ("config-not-json", _write(CONFIG_NAME, b"{not json"), ValueError, [CONFIG_NAME, "not valid JSON"]),
    ("config-truncated", _truncate(CONFIG_NAME, lambda n: n // 2), ValueError, [CONFIG_NAME, "JSON"]),
    ("config-a-list", _write(CONFIG_NAME, b"[1, 2]"), ValueError, [CONFIG_NAME, "JSON object"]),
    ("r-a-string", _edit_config(r="8"), ValueError, [CONFIG_NAME, "r must be a positive integer"]),
    ("r-zero", _edit_config(r=0), ValueError, [CONFIG_NAME, "r must be"]),
    ("r-bool", _edit_config(r=True), ValueError, [CONFIG_NAME, "r must be"]),
    ("alpha-a-string", _edit_config(lora_alpha="16"), ValueError, [CONFIG_NAME, "lora_alpha"]),
    ("targets-an-int", _edit_config(target_modules=5), ValueError, [CONFIG_NAME, "target_modules"]),
    ("targets-empty", _edit_config(target_modules=[]), ValueError, [CONFIG_NAME, "target_modules"]),
    ("targets-bad-regex", _edit_config(target_modules="(("), ValueError, ["not a valid regex"]),
    ("targets-mixed-types", _edit_config(target_modules=["q_proj", 3]), ValueError, ["target_modules"]),
    ("layers-a-string", _edit_config(layers_to_transform="0"), ValueError, ["layers_to_transform"]),
    (
        "regex-with-layers",
        _edit_config(target_modules=".*q_proj", layers_to_transform=[0]),
        ValueError,
        ["regex"],
    ),
    ("rslora-a-string", _edit_config(use_rslora="yes"), ValueError, ["use_rslora"]),
    ("rank-pattern-a-list", _edit_config(rank_pattern=[1]), ValueError, ["rank_pattern"]),
    ("rank-mismatch", _edit_config(r=4), ValueError, [W, "rank 2", "config says 4"]),
    ("no-weights", _delete(W), FileNotFoundError, [W]),
    ("weights-empty", _write(W, b""), ValueError, [W, "empty"]),
    ("weights-garbage", _write(W, b"this is not a safetensors file" * 4), ValueError, [W, "safetensors"]),
    ("weights-truncated", _truncate(W, lambda n: n - 7), ValueError, [W, "truncated or corrupt"]),
    ("weights-header-cut", _truncate(W, lambda n: 20), ValueError, [W, "safetensors"]),
    (
        "weights-no-lora",
        _edit_tensors(lambda s: s.clear() or s.update(x=torch.ones(1))),
        ValueError,
        [W, "'x'"],
    ),
    ("missing-lora-b", _edit_tensors(_pop(f"{Q0}.lora_B.weight")), ValueError, [W, "no lora_B"]),
    ("missing-module", _edit_tensors(_drop_q0), ValueError, [W, "no weights for", "q_proj"]),
    (
        "shape-vs-model",
        _edit_tensors(_set(f"{Q0}.lora_A.weight", lambda t: torch.ones(2, 31))),
        ValueError,
        [W, "does not fit the model", "[r, 32]"],
    ),
    (
        "rank-a-vs-b",
        _edit_tensors(_set(f"{Q0}.lora_B.weight", lambda t: torch.ones(t.shape[0], 3))),
        ValueError,
        [W, "does not fit"],
    ),
    ("three-d", _edit_tensors(_set(f"{Q0}.lora_A.weight", lambda t: t[None])), ValueError, [W, "2-D"]),
    (
        "int-tensor",
        _edit_tensors(_set(f"{Q0}.lora_A.weight", lambda t: t.long())),
        ValueError,
        [W, "floating"],
    ),
    ("non-finite", _edit_tensors(_nan), ValueError, [W, "NaN or infinite"]),
    (
        "unknown-module",
        _edit_tensors(_add_unknown_module),
        ValueError,
        [W, "does not have"],
    ),
]


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    model = make_model("llama")
    path = save_adapter(
        model, tmp_path_factory.mktemp("template") / "a", r=2, target_modules=["q_proj", "v_proj"]
    )
    return model, Path(path)


def _broken_copy(template: Path, tmp_path: Path, breakage) -> Path:
    target = tmp_path / "bad"
    shutil.copytree(template, target)
    breakage(target)
    return target


@pytest.mark.parametrize("case, breakage, error, words", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_broken_adapter_is_named(case, breakage, error, words, llama_and_adapter, tmp_path):
    model, template = llama_and_adapter
    path = _broken_copy(template, tmp_path, breakage)
    with pytest.raises(error) as info:
        load_adapter("bad", path, dict(model.named_modules()))
    message = str(info.value)
    for word in ["'bad'", *words]:
        assert word in message, (case, message)


@pytest.mark.parametrize(
    "case, breakage, error, words",
    [
        c
        for c in ADAPTER_CASES
        if c[0] in ("weights-truncated", "config-not-json", "non-finite", "shape-vs-model")
    ],
    ids=["weights-truncated", "config-not-json", "non-finite", "shape-vs-model"],
)
def test_failed_attach_leaves_the_model_unchanged(case, breakage, error, words, llama_and_adapter, tmp_path):
    template = llama_and_adapter[1]
    model = make_model("llama")
    good = tmp_path / "good"
    shutil.copytree(template, good)
    path = _broken_copy(template, tmp_path, breakage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(error, match="'bad'"):
        dlp.attach(model, {"good": good, "bad": path})  # the good one first: nothing is half-attached
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # And a failed add() on an attached model keeps its adapters and selection.
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        base = model(ids).logits
    lora = dlp.attach(model, {"good": good})
    lora.select([[("good", 1.0)]])
    with torch.no_grad():
        selected = model(ids).logits
    assert not torch.allclose(selected, base)
    with pytest.raises(error, match="'bad'"):
        lora.add("bad", path)
    assert tuple(lora.names) == ("good",)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, selected)  # the selection still holds
    lora.detach()
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before


# ------------------------------------------------------------------------------- generic readers
def _jsonl(text: str | bytes):
    return lambda p: p.write_bytes(text if isinstance(text, bytes) else text.encode())


JSONL_CASES = [
    ("missing", lambda p: None, FileNotFoundError, ["does not exist"]),
    ("a-directory", lambda p: p.mkdir(), ValueError, ["not a file"]),
    ("empty", _jsonl(""), ValueError, ["no lines"]),
    ("blank-lines-only", _jsonl("\n  \n"), ValueError, ["no lines"]),
    ("not-utf8", _jsonl(b'{"text": "\xff", "task": "a"}\n'), ValueError, ["UTF-8"]),
    ("not-json", _jsonl('{"text": "a", "task": "x"}\nnot json\n'), ValueError, [":2:", "not valid JSON"]),
    ("truncated-line", _jsonl('{"text": "a", "task": "x"}\n{"text": "b", "ta'), ValueError, [":2:", "JSON"]),
    ("a-list", _jsonl('["a", "x"]\n'), ValueError, [":1:", "JSON object"]),
    ("no-text", _jsonl('{"task": "x"}\n'), ValueError, [":1:", "'text'"]),
    ("no-label", _jsonl('{"text": "a"}\n'), ValueError, [":1:", "'task'"]),
    ("text-not-str", _jsonl('{"text": 3, "task": "x"}\n'), ValueError, [":1:", '"text"', "non-empty string"]),
    (
        "blank-then-bad",
        _jsonl('\n{"text": "a", "task": "x"}\n\n{"text": "", "task": "x"}\n'),
        ValueError,
        [":4:"],
    ),
    ("text-blank", _jsonl('{"text": "  ", "task": "x"}\n'), ValueError, ['"text"']),
    ("label-a-list", _jsonl('{"text": "a", "task": ["x"]}\n'), ValueError, ["'task'", "string or an int"]),
    ("label-bool", _jsonl('{"text": "a", "task": true}\n'), ValueError, ["'task'"]),
    ("label-empty", _jsonl('{"text": "a", "task": ""}\n'), ValueError, ["'task'"]),
    ("label-unknown", _jsonl('{"text": "a", "task": "z"}\n'), ValueError, ["'z'", "not one of"]),
]


@pytest.mark.parametrize("case, breakage, error, words", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_broken_jsonl_is_named(case, breakage, error, words, tmp_path):
    path = tmp_path / "data.jsonl"
    breakage(path)
    with pytest.raises(error) as info:
        read_labelled_jsonl(path, "task", labels=["x", "y"], owner="training data")
    for word in ["training data", "data.jsonl", *words]:
        assert word in str(info.value), (case, str(info.value))


def test_jsonl_reads_ints_as_labels_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "x", "extra": 0}\n')
    assert read_labelled_jsonl(path, "label") == (["a", "b"], ["1", "x"])


def _save_tensors(p: Path):
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(p))


def _save_and_cut(keep):
    def edit(p: Path):
        _save_tensors(p)
        p.write_bytes(p.read_bytes()[: keep(p.stat().st_size)])

    return edit


def _torch_save(obj):
    return lambda p: torch.save(obj, p)


def _torch_save_and_cut(p: Path):
    torch.save({"w": torch.arange(100.0)}, p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


class _Foreign:
    pass


FILE_CASES = [
    # (case id, reader, how to make the file, error, words)
    ("json-missing", read_json_object, lambda p: None, FileNotFoundError, ["does not exist"]),
    ("json-empty", read_json_object, _jsonl(""), ValueError, ["empty"]),
    ("json-garbage", read_json_object, _jsonl(b"\x00\x01\x02"), ValueError, ["not valid JSON"]),
    ("json-number", read_json_object, _jsonl("3"), ValueError, ["JSON object", "int"]),
    ("st-missing", read_safetensors, lambda p: None, FileNotFoundError, ["does not exist"]),
    ("st-a-directory", read_safetensors, lambda p: p.mkdir(), ValueError, ["not a file"]),
    ("st-empty", read_safetensors, _jsonl(b""), ValueError, ["empty"]),
    ("st-garbage", read_safetensors, _jsonl(b"\x13" * 64), ValueError, ["not a readable safetensors"]),
    ("st-json", read_safetensors, _jsonl('{"w": [1, 2]}'), ValueError, ["not a readable safetensors"]),
    ("st-truncated", read_safetensors, _save_and_cut(lambda n: n - 4), ValueError, ["truncated"]),
    ("st-header-only", read_safetensors, _save_and_cut(lambda n: 8), ValueError, ["safetensors"]),
    ("pt-missing", read_torch_state, lambda p: None, FileNotFoundError, ["does not exist"]),
    ("pt-empty", read_torch_state, _jsonl(b""), ValueError, ["empty"]),
    (
        "pt-garbage",
        read_torch_state,
        _jsonl(b"garbage" * 10),
        ValueError,
        ["not a readable torch checkpoint"],
    ),
    ("pt-truncated", read_torch_state, _torch_save_and_cut, ValueError, ["not a readable torch checkpoint"]),
    (
        "pt-code",
        read_torch_state,
        _torch_save({"x": _Foreign}),
        ValueError,
        ["not a readable torch checkpoint"],
    ),
    ("pt-a-list", read_torch_state, _torch_save([1, 2]), ValueError, ["list", "expected a dict"]),
]


@pytest.mark.parametrize("case, reader, make, error, words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_broken_file_is_named(case, reader, make, error, words, tmp_path):
    path = tmp_path / "the-file"
    make(path)
    with pytest.raises(error) as info:
        reader(path, "router 'r'")
    for word in ["router 'r'", "the-file", *words]:
        assert word in str(info.value), (case, str(info.value))


def test_readers_return_what_was_written(tmp_path):
    _save_tensors(tmp_path / "t")
    assert torch.equal(read_safetensors(tmp_path / "t", "x")["w"], torch.arange(6.0).reshape(2, 3))
    torch.save({"a": torch.ones(2), "b": [1, "x"]}, tmp_path / "c")
    state = read_torch_state(tmp_path / "c", "x")
    assert torch.equal(state["a"], torch.ones(2)) and state["b"] == [1, "x"]
    (tmp_path / "j").write_text('{"a": [1]}')
    assert read_json_object(tmp_path / "j", "x") == {"a": [1]}


# ------------------------------------------------------------------- fine-tuning: resume state
def _tiny_dynamic():
    from dlplora_triton.finetune import DynamicLoRA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return DynamicLoRA(model, ["0", "2"], budget=6, total_steps=10, interval=2)


def _state_edit(key, value):
    def edit(state):
        if value is _DROP:
            del state[key]
        else:
            state[key] = value(state[key]) if callable(value) else value
        return state

    return edit


_DROP = object()
STATE_CASES = [
    ("not-a-dict", lambda s: [s], ["expected a dict", "list"]),
    ("no-ranks", _state_edit("ranks", _DROP), ["no ranks"]),
    ("other-modules", _state_edit("paths", ["0", "1"]), ["other modules"]),
    ("other-budget", _state_edit("budget", 7), ["another budget"]),
    ("ranks-short", _state_edit("ranks", [6]), ["ranks [6]"]),
    ("ranks-off-budget", _state_edit("ranks", [1, 1]), ["summing to 6"]),
    ("rank-over-module", _state_edit("ranks", [1, 5]), ["ranks [1, 5]"]),
    ("ranks-strings", _state_edit("ranks", ["3", "3"]), ["ranks"]),
    ("ipt-shape", _state_edit("ipt", torch.zeros(3, dtype=torch.float64)), ["'ipt'", "shape [2]"]),
    ("ipt-nan", _state_edit("ipt", torch.tensor([0.0, float("nan")])), ["'ipt'", "finite"]),
    ("unc-ints", _state_edit("unc", torch.zeros(2, dtype=torch.long)), ["'unc'"]),
    ("step-negative", _state_edit("global_step", -1), ["global_step"]),
    ("step-a-string", _state_edit("global_step", "3"), ["global_step"]),
    ("generator-garbage", _state_edit("generator", torch.tensor([1, 2], dtype=torch.uint8)), ["generator"]),
    ("history-not-json", _state_edit("history", "{"), ["history"]),
    ("history-not-list", _state_edit("history", "{}"), ["history must be a JSON list"]),
    ("schedule-bad", _state_edit("schedule", {"total_steps": 0}), ["schedule"]),
]


@pytest.mark.parametrize("case, edit, words", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_broken_resume_state_changes_nothing(case, edit, words):
    dyn = _tiny_dynamic()
    saved = dyn.state_dict()
    dyn.set_rank("0", 4), dyn.set_rank("2", 2)  # the state to keep: ranks 4 / 2, not the saved 3 / 3
    dyn.global_step = 5
    before = {k: v.clone() for k, v in dyn.model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        dyn.load_state_dict(edit(saved), source="ckpt.pt")
    for word in ["ckpt.pt", *words]:
        assert word in str(info.value), (case, str(info.value))
    assert dyn.ranks == {"0": 4, "2": 2} and dyn.global_step == 5
    after = dyn.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_resume_state_round_trips():
    dyn = _tiny_dynamic()
    dyn.set_rank("0", 4), dyn.set_rank("2", 2)
    state = dyn.state_dict()
    other = _tiny_dynamic()
    other.load_state_dict(state)
    assert other.ranks == {"0": 4, "2": 2} and other.schedule.as_dict() == dyn.schedule.as_dict()


def _valid_checkpoint():
    from dlplora_triton.finetune.command import CHECKPOINT_FORMAT

    return {
        "format": CHECKPOINT_FORMAT,
        "args": {},
        "labels": ["a", "b"],
        "step": 3,
        "trainable": {"w": torch.ones(2)},
        "dynamic": {},
        "optimizer": {},
        "scheduler": {},
        "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2], None]},
        "metrics": [],
    }


def _ckpt(change):
    def make(p: Path):
        state = _valid_checkpoint()
        change(state)
        torch.save(state, p)

    return make


CHECKPOINT_CASES = [
    ("missing", lambda p: None, FileNotFoundError, ["does not exist"]),
    ("empty", _jsonl(b""), ValueError, ["empty"]),
    ("garbage", _jsonl(b"PK\x03\x04 not a zip"), ValueError, ["not a readable torch checkpoint"]),
    ("truncated", _torch_save_and_cut, ValueError, ["not a readable torch checkpoint"]),
    ("other-format", _ckpt(lambda s: s.update(format="something/2")), ValueError, ["not a dlplora finetune"]),
    ("no-args", _ckpt(lambda s: s.pop("args")), ValueError, ["'args'"]),
    ("step-a-string", _ckpt(lambda s: s.update(step="3")), ValueError, ["'step'"]),
    ("step-bool", _ckpt(lambda s: s.update(step=True)), ValueError, ["'step'"]),
    ("trainable-not-tensors", _ckpt(lambda s: s.update(trainable={"w": [1.0]})), ValueError, ["'trainable'"]),
    (
        "rng-incomplete",
        _ckpt(lambda s: s.update(rng={"torch": torch.get_rng_state()})),
        ValueError,
        ["'rng'"],
    ),
]


@pytest.mark.parametrize("case, make, error, words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_finetune_checkpoint_is_named(case, make, error, words, tmp_path):
    from dlplora_triton.finetune import read_checkpoint

    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(error) as info:
        read_checkpoint(path)
    for word in ["finetune checkpoint", "checkpoint.pt", *words]:
        assert word in str(info.value), (case, str(info.value))


def test_valid_finetune_checkpoint_reads(tmp_path):
    from dlplora_triton.finetune import read_checkpoint

    _ckpt(lambda s: None)(tmp_path / "c.pt")
    assert read_checkpoint(tmp_path / "c.pt")["step"] == 3


def test_trainer_checkpoint_folder_missing_or_broken(tmp_path):
    dyn = _tiny_dynamic()
    callback = dyn.callback()
    with pytest.raises(FileNotFoundError, match="dlplora_dynamic.pt"):
        callback.load_checkpoint(tmp_path)
    (tmp_path / callback.STATE_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="DynamicLoRA checkpoint.*dlplora_dynamic.pt"):
        callback.load_checkpoint(tmp_path)
    torch.save(dyn.state_dict(), tmp_path / callback.STATE_FILE)
    callback.load_checkpoint(tmp_path)  # the state it wrote loads
