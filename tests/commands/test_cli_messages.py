"""What a first hour with the `dlplora` command runs into: each mistake gets one line naming the real
problem (exit code 2), output paths are checked before any work, and train-router can name the tasks it
trains and map them onto the adapters that generate and serve have."""

import json
from pathlib import Path

import pytest

from dlplora_triton import Router
from dlplora_triton.cli import main
from dlplora_triton.commands import route
from dlplora_triton.demo.tasks import ADAPTERS_DIR
from dlplora_triton.readers import check_output_dir, check_output_file, read_labelled_jsonl


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """Passes the command's folder check (config.json); nothing in these tests loads it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def tiny_router(tmp_path_factory) -> Path:
    """A router over de / fr / code, saved (seconds: a small net, two epochs)."""
    texts = [f"Die Datei {i} wird gelöscht." for i in range(20)]
    texts += [f"Le fichier {i} est supprimé." for i in range(20)]
    texts += [f"def f{i}(x): return x + {i}" for i in range(20)]
    tasks = ["de"] * 20 + ["fr"] * 20 + ["code"] * 20
    router = Router.train(texts, tasks, background=None, num_buckets=2**10, hidden=(8,), epochs=2)
    return router.save(tmp_path_factory.mktemp("router"))


def test_a_router_path_that_is_a_file(capsys, tmp_path):
    file = tmp_path / "router.json"
    file.write_text("{}")
    line = _error(capsys, ["route", "--router", str(file), "hello"])
    assert "is a file" in line and "does not exist" not in line and "router_config.json" in line
    with pytest.raises(ValueError, match="is a file"):
        Router.load(file)


def test_key_errors_read_without_stray_quotes(capsys, monkeypatch):
    def fail(args):
        raise KeyError("unknown adapter 'xx'; adapters: ['de']")

    monkeypatch.setattr(route, "run", fail)
    line = _error(capsys, ["route", "--router", "r", "hello"])
    assert line == "dlplora route: error: unknown adapter 'xx'; adapters: ['de']"


def test_milora_gates_given_a_plain_adapter(capsys, model_folder):
    line = _error(
        capsys, ["milora-gates", "--model", str(model_folder), "--milora", str(ADAPTERS_DIR / "de"), "hi"]
    )
    assert "plain PEFT LoRA adapter" in line and "milora_config.json" in line and "'mi'" not in line


def test_plain_adapter_has_no_gates_in_the_api(tmp_path):
    from dlplora_triton import attach
    from dlplora_triton.demo.toy_model import build_llama, make_peft_adapters

    model = build_llama(64, hidden=32, intermediate=64, layers=2)
    paths = make_peft_adapters(model, {"code": {"r": 4, "target_modules": ["q_proj"]}}, tmp_path)
    lora = attach(model, paths)
    try:
        with pytest.raises(KeyError, match="'code' is a plain LoRA adapter .*which has no gates"):
            lora.gates("code")
        with pytest.raises(KeyError, match="'nope' is not an attached adapter"):
            lora.gates("nope")
    finally:
        lora.detach()


@pytest.mark.parametrize("command", ["generate", "milora-gates"])
def test_model_pointing_at_an_adapter_folder(capsys, command, tiny_router, tmp_path):
    argv = [command, "--model", str(ADAPTERS_DIR / "de"), "hello"]
    argv += ["--router", str(tiny_router), "--adapters", str(ADAPTERS_DIR)] if command == "generate" else []
    argv += ["--milora", str(tmp_path)] if command == "milora-gates" else []
    line = _error(capsys, argv)
    assert "is a PEFT adapter folder, not a model" in line and "config.json" in line, line
    assert "tokenizer" not in line.split("not a model")[0]  # not transformers' tokenizer error


def test_model_folder_without_config(capsys, tmp_path, tiny_router):
    line = _error(
        capsys,
        [
            "generate",
            "--model",
            str(tmp_path),
            "--router",
            str(tiny_router),
            "--adapters",
            str(ADAPTERS_DIR),
            "x",
        ],
    )
    assert "has no config.json" in line


def test_generate_names_the_router_adapters_it_lacks(capsys, model_folder, tiny_router, tmp_path):
    line = _error(
        capsys,
        [
            "generate",
            "--model",
            str(model_folder),
            "--router",
            str(tiny_router),
            "--adapter",
            f"de={ADAPTERS_DIR / 'de'}",
            "x",
        ],
    )
    assert "routes to adapters ['code', 'de', 'fr']" in line and "['code', 'fr'] not found" in line
    assert "train-router --adapters" in line
    empty = tmp_path / "no-adapters"
    empty.mkdir()
    line = _error(
        capsys,
        [
            "generate",
            "--model",
            str(model_folder),
            "--router",
            str(tiny_router),
            "--adapters",
            str(empty),
            "x",
        ],
    )
    assert "no adapter folders" in line


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails a test that gets as far as loading the model."""
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("loaded the model before checking the arguments")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_generate_checks_max_new_tokens_first(capsys, model_folder, tiny_router, no_model_load, tokens):
    argv = ["generate", "--model", str(model_folder), "--router", str(tiny_router)]
    line = _error(capsys, [*argv, "--adapters", str(ADAPTERS_DIR), "--max-new-tokens", tokens, "x"])
    assert line == f"dlplora generate: error: --max-new-tokens must be at least 1, got {tokens}"


def test_generate_checks_every_adapter_folder_first(
    capsys, model_folder, tiny_router, no_model_load, tmp_path
):
    argv = ["generate", "--model", str(model_folder), "--router", str(tiny_router)]
    good = [f"--adapter={name}={ADAPTERS_DIR / name}" for name in ("de", "fr")]
    line = _error(capsys, [*argv, *good, f"--adapter=code={tmp_path / 'nowhere'}", "x"])
    assert "adapter 'code'" in line and "nowhere" in line and "no such directory" in line
    broken = tmp_path / "code"  # a config without its weights
    broken.mkdir()
    (broken / "adapter_config.json").write_text((ADAPTERS_DIR / "de" / "adapter_config.json").read_text())
    line = _error(capsys, [*argv, *good, f"--adapter=code={broken}", "x"])
    assert "adapter 'code'" in line and "no adapter_model.safetensors" in line
    truncated = tmp_path / "adapters"  # --adapters: a folder whose code/ holds a cut-off weights file
    for name in ("de", "fr", "code"):
        (truncated / name).mkdir(parents=True)
        for file in (ADAPTERS_DIR / name).iterdir():
            (truncated / name / file.name).write_bytes(file.read_bytes())
    weights = truncated / "code" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = _error(capsys, [*argv, "--adapters", str(truncated), "x"])
    assert "adapter 'code'" in line and "truncated or corrupt" in line


def test_train_router_checks_out_before_training(capsys, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(Router, "train", never)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "task": "x"}\n{"text": "b", "task": "y"}\n')
    file = tmp_path / "file"
    file.write_text("")
    line = _error(capsys, ["train-router", "--data", str(data), "--out", str(file)])
    assert "--out" in line and "is a file" in line
    line = _error(capsys, ["train-router", "--data", str(data), "--out", str(file / "router")])
    assert "is a file, so no folder can be made there" in line


def test_a_number_as_task_is_refused_naming_the_line(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "task": "x"}\n{"text": "b", "task": 3}\n')
    line = _error(capsys, ["train-router", "--data", str(data), "--out", str(tmp_path / "r")])
    assert f"{data}:2" in line and "'task' must be a task name" in line and 'write "3"' in line
    with pytest.raises(ValueError):  # the API refuses it too
        Router.train(["a", "b"], ["x", 3])
    assert read_labelled_jsonl(data, "task")[1] == ["x", "3"]  # other readers (class labels) keep ints


def test_compile_check_checks_its_json_path_first(capsys, tmp_path, monkeypatch):
    from dlplora_triton.commands import compile_check

    monkeypatch.setattr(compile_check, "check", lambda *a: pytest.fail("compiled before checking --json"))
    line = _error(capsys, ["compile-check", "--quick", "--json", str(tmp_path / "missing" / "r.json")])
    assert "--json" in line and "does not exist" in line
    line = _error(capsys, ["compile-check", "--quick", "--json", str(tmp_path)])
    assert "is a folder" in line


def test_finetune_checks_out_before_loading(capsys, model_folder, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    argv = ["finetune", "--model", str(model_folder), "--train", str(data), "--out", str(file / "run")]
    line = _error(capsys, argv)
    assert line.startswith("dlplora finetune: error: --out") and "is a file" in line


def test_output_path_checks(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"  # created later
    assert check_output_file(tmp_path / "r.json", "--json") == tmp_path / "r.json"
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(ValueError, match="its folder .* is a file"):
        check_output_file(tmp_path / "f" / "r.json", "--json")


def test_train_router_restricts_and_maps_tasks_onto_adapters(capsys, tmp_path):
    rows = [{"text": f"Die Datei {i} wird gelöscht.", "task": "de"} for i in range(20)]
    rows += [{"text": f"Der Benutzer {i} ist angemeldet.", "task": "de_more"} for i in range(20)]
    rows += [{"text": f"def f{i}(x): return x + {i}", "task": "code"} for i in range(20)]
    rows += [{"text": f"Le fichier {i} est supprimé.", "task": "fr"} for i in range(20)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "router"
    argv = ["train-router", "--data", str(data), "--out", str(out), "--epochs", "2", "--no-general"]
    assert main([*argv, "--tasks", "de,de_more,code", "--adapters", "de,de_more=de,code"]) == 0
    assert "it routes to the adapters ['code', 'de']" in capsys.readouterr().out
    router = Router.load(out)
    assert router.classes == ["code", "de", "de_more"] and router.names == ["code", "de"]
    assert router.adapter_of == {"code": "code", "de": "de", "de_more": "de"}
    line = _error(capsys, [*argv, "--tasks", "de,es"])
    assert "--tasks names tasks not in" in line and "['es']" in line
    line = _error(capsys, [*argv, "--adapters", "de=,code"])
    assert "TASK=ADAPTER" in line


def test_train_router_warns_about_too_little_data_and_saves(capsys, tmp_path):
    rows = [{"text": f"Die Datei {i} wird gelöscht.", "task": "de"} for i in range(12)]
    rows += [{"text": f"def f{i}(x): return x + {i}", "task": "code"} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "router"
    assert (
        main(["train-router", "--data", str(data), "--out", str(out), "--epochs", "2", "--no-general"]) == 0
    )
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()[-1:]
    assert line.startswith("dlplora train-router: warning: this router may route badly: 2 of 2 tasks")
    assert "(code 12, de 12)" in line and "at least 50 texts" in line
    assert "saved to" in captured.out
    assert Router.load(out).report["warnings"][0].startswith("2 of 2 tasks have fewer than 50 texts")
