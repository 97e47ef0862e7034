"""The ``dlplora`` dispatcher and its command modules, the old import paths of what moved into them, and
the one check of route options (``dlplora_triton.route_options``) as each entry point words it."""

import argparse
import ast
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dlplora_triton import cli
from dlplora_triton.cli import COMMANDS, main
from dlplora_triton.defaults import DEFAULT_P
from dlplora_triton.route_options import RouteOptionError, RouteOptions, check_route_options

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dlplora_triton"

# The least each subcommand's parser accepts (its required options and positionals).
MINIMAL = {
    "demo": [],
    "compile-check": [],
    "train-router": ["--data", "d.jsonl", "--out", "o"],
    "finetune": ["--train", "t.jsonl", "--out", "o"],
    "serve": ["--adapters", "a", "--router", "r"],
    "route": ["--router", "r", "x"],
    "generate": ["--model", "m", "--adapters", "a", "--router", "r", "x"],
    "milora-gates": ["--model", "m", "--milora", "mi", "x"],
    "data": [],
}


def _module(name: str):
    return importlib.import_module(f"dlplora_triton.commands.{COMMANDS[name]}")


def test_the_table_is_the_parser_and_every_module_has_the_interface():
    (sub,) = [a for a in cli._build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == list(COMMANDS) == list(MINIMAL)
    for name in COMMANDS:
        module = _module(name)
        assert isinstance(module.HELP, str) and module.HELP
        assert callable(module.build_parser) and callable(module.run)
        alone = module.build_parser()  # the same options on a parser of its own
        assert alone.prog == f"dlplora {name}"
        own = {o for a in alone._actions for o in a.option_strings}
        assert own == {o for a in sub.choices[name]._actions for o in a.option_strings}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_is_dispatched_to_its_run(name, monkeypatch):
    seen = {}

    def run(args):
        seen["args"] = args
        return 7

    monkeypatch.setattr(_module(name), "run", run)
    extra = ["--model", "m", "--port", "8001"] if name == "serve" else []
    assert main([name, *MINIMAL[name], *extra]) == 7
    assert seen["args"].command == name
    if name == "serve":  # what the parser does not know goes to vLLM's server
        assert seen["args"].passed_on == extra


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "serve"])
def test_unknown_arguments_are_refused_by_the_subcommand(name, capsys, monkeypatch):
    monkeypatch.setattr(_module(name), "run", lambda args: pytest.fail("ran with an unknown argument"))
    with pytest.raises(SystemExit) as exit_info:
        main([name, *MINIMAL[name], "--no-such-option"])
    assert exit_info.value.code == 2
    assert f"dlplora {name}: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["nosuch"]])
def test_no_or_an_unknown_subcommand_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage: dlplora" in capsys.readouterr().err


@pytest.mark.parametrize("error", [FileNotFoundError, ValueError, KeyError, TypeError])
def test_bad_input_is_one_line_and_exit_2_for_every_command(error, capsys, monkeypatch):
    for name in COMMANDS:

        def run(args, error=error):
            raise error("what is wrong")

        monkeypatch.setattr(_module(name), "run", run)
        assert main([name, *MINIMAL[name]]) == 2
        assert capsys.readouterr().err == f"dlplora {name}: error: what is wrong\n"


def _module_level_imports(path: Path) -> set[str]:
    """Modules imported at the top of a file (not inside functions), relative ones as written."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize(
    "path",
    sorted((PACKAGE / "commands").glob("*.py")) + [PACKAGE / "defaults.py", PACKAGE / "route_options.py"],
    ids=lambda p: p.name,
)
def test_commands_import_nothing_heavy_before_run(path):
    """Building the parsers needs argparse and the constants only: torch, transformers, vLLM and the
    package's torch-using modules are imported inside run()."""
    light = {"__future__", "argparse", "collections.abc", "dataclasses", "json", "math", "os", "pathlib"}
    light |= {"..defaults", "..route_options", "._common", ".defaults"}
    heavy = _module_level_imports(path) - light
    assert not heavy, f"{path.name} imports {sorted(heavy)} at module level"


def test_only_the_dispatcher_imports_the_commands():
    for path in PACKAGE.rglob("*.py"):
        if "commands" in path.parts or path.name == "cli.py":
            continue
        for name in _module_level_imports(path):
            assert "commands" not in name.split("."), f"{path.relative_to(ROOT)} imports {name}"


def test_milora_show_holds_display_only():
    assert _module_level_imports(PACKAGE / "milora" / "show.py") <= {
        "__future__",
        "collections.abc",
        ".._moved",  # the deprecated names' __getattr__
    }
    from dlplora_triton.milora.show import format_gates

    result = {"modules": ["q", "v"], "gates": [[[0.7, 0.0], [0.2, 0.8]]]}
    assert format_gates(["hi"], result) == "'hi':\n  layer  0: q 0.700\n  layer  1: v 0.800, q 0.200"


# -- the old import paths ------------------------------------------------------------------------------


def _new(module: str, name: str):
    return getattr(importlib.import_module(module), name)


MOVED = [
    ("dlplora_triton.cli", "DEFAULT_P", lambda: DEFAULT_P),
    (
        "dlplora_triton.finetune",
        "finetune_main",
        lambda: _new("dlplora_triton.commands.finetune", "finetune_main"),
    ),
    (
        "dlplora_triton.finetune.command",
        "finetune_main",
        lambda: _new("dlplora_triton.commands.finetune", "finetune_main"),
    ),
    (
        "dlplora_triton.finetune.command",
        "_build_finetune_parser",
        lambda: _new("dlplora_triton.commands.finetune", "build_parser"),
    ),
    (
        "dlplora_triton.integrations.vllm.serve",
        "build_parser",
        lambda: _new("dlplora_triton.commands.serve", "build_parser"),
    ),
    (
        "dlplora_triton.milora.show",
        "gates_main",
        lambda: _new("dlplora_triton.commands.milora_gates", "show_gates"),
    ),
    (
        "dlplora_triton.milora.show",
        "prompt_gates",
        lambda: _new("dlplora_triton.commands.milora_gates", "prompt_gates"),
    ),
    ("dlplora_triton.compile_check", "main", lambda: _new("dlplora_triton.commands.compile_check", "check")),
]


@pytest.mark.parametrize("module, name, new", MOVED, ids=[f"{m}.{n}" for m, n, _ in MOVED])
def test_an_old_import_still_works_and_warns(module, name, new):
    with pytest.warns(DeprecationWarning, match=f"{name} (moved|is deprecated)"):
        scope: dict = {}
        exec(f"from {module} import {name}", scope)
    assert scope[name] is new() or scope[name] == new()


def test_unknown_names_still_raise_attribute_error():
    for module in {m for m, _, _ in MOVED}:
        with pytest.raises(AttributeError):
            importlib.import_module(module).no_such_name  # noqa: B018


def test_the_old_serve_main_is_dlplora_serve(tmp_path, capsys):
    with pytest.warns(DeprecationWarning):
        from dlplora_triton.integrations.vllm.serve import serve_main
    argv = ["--adapters", str(tmp_path / "none"), "--router", "r", "--model", "m"]
    assert serve_main(argv) == 2
    assert capsys.readouterr().err.startswith("dlplora serve: error: --adapters")


def test_importing_the_modules_warns_about_nothing():
    """Only the old names warn, not the modules that keep them (a fresh interpreter: no reloads here)."""
    modules = [
        "cli",
        "finetune",
        "finetune.command",
        "milora.show",
        "compile_check",
        "integrations.vllm.serve",
    ]
    code = "; ".join(f"import dlplora_triton.{m}" for m in modules)
    proc = subprocess.run(
        [sys.executable, "-W", "error:dlplora_triton:DeprecationWarning", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# -- route options -------------------------------------------------------------------------------------


def test_good_options_come_back_checked():
    assert check_route_options() == RouteOptions(p=DEFAULT_P)
    got = check_route_options(p=1, top_k=2, weighting="softmax", min_confidence=0, base_threshold=1)
    assert got == RouteOptions(p=1.0, top_k=2, weighting="softmax", min_confidence=0.0, base_threshold=1.0)
    assert isinstance(got.p, float) and isinstance(got.base_threshold, float)
    assert check_route_options(top_k=4, max_top_k=4).top_k == 4


BAD = [
    ({"p": 0}, "p", "must be a number in (0, 1], got 0"),
    ({"p": -0.0}, "p", "must be a number in (0, 1]"),
    ({"p": 1.5}, "p", "must be a number in (0, 1]"),
    ({"p": math.nan}, "p", "got nan"),
    ({"p": math.inf}, "p", "got inf"),
    ({"p": True}, "p", "got True"),
    ({"p": "0.5"}, "p", "got '0.5'"),
    ({"p": None}, "p", "got None"),
    ({"p": 10**400}, "p", "must be a number"),  # an int too big for a float: no OverflowError
    ({"top_k": 0}, "top_k", "must be None or an integer >= 1, got 0"),
    ({"top_k": 1.0}, "top_k", "got 1.0"),
    ({"top_k": True}, "top_k", "got True"),
    ({"top_k": None, "explicit": ("top_k",)}, "top_k", "must be an integer >= 1, got None"),
    ({"top_k": 5, "max_top_k": 4, "max_top_k_why": "the limit"}, "top_k", "from 1 to 4 (the limit), got 5"),
    ({"weighting": "linear"}, "weighting", "must be one of ('renorm', 'softmax'), got 'linear'"),
    ({"min_confidence": -0.1}, "min_confidence", "must be a number in [0, 1], got -0.1"),
    ({"min_confidence": math.nan}, "min_confidence", "must be a number in [0, 1]"),
    ({"base_threshold": 0}, "base_threshold", "must be a number in (0, 1], got 0"),
    ({"base_threshold": math.inf}, "base_threshold", "got inf"),
    ({"base_threshold": None, "explicit": ("base_threshold",)}, "base_threshold", "got None"),
]


@pytest.mark.parametrize("options, field, words", BAD, ids=[f"{f}-{o}" for o, f, _ in BAD])
def test_each_bad_value_is_named(options, field, words):
    with pytest.raises(RouteOptionError) as info:
        check_route_options(**options)
    err = info.value
    assert isinstance(err, ValueError) and err.field == field
    assert str(err).startswith(f"{field} must be ") and words in str(err), str(err)
    assert err.named("--x") == f"--x {err.problem}"


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(RouteOptionError) as info:
        check_route_options(p="x" * 100_000)
    assert len(str(info.value)) < 100


def test_the_api_and_the_commands_word_it_the_same(tmp_path, capsys):
    import torch

    from dlplora_triton import top_p_select

    with pytest.raises(ValueError, match=r"^top_k must be None or an integer >= 1, got 0$"):
        top_p_select(torch.tensor([[0.5, 0.5]]), top_k=0)
    # route checks its options before it loads the router
    assert main(["route", "--router", str(tmp_path / "none"), "x", "--p", "1.5"]) == 2
    assert capsys.readouterr().err == "dlplora route: error: p must be a number in (0, 1], got 1.5\n"
    assert main(["route", "--router", str(tmp_path / "none"), "x", "--top-k", "0"]) == 2
    assert "top_k must be None or an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, line",
    [
        ("--p", "1.5", "dlplora serve: error: --p must be a number in (0, 1], got 1.5"),
        ("--p", "nan", "dlplora serve: error: --p must be a number in (0, 1], got nan"),
        ("--top-k", "0", "dlplora serve: error: --top-k must be an integer >= 1, got 0"),
    ],
)
def test_serve_names_its_flags(flag, value, line, capsys, tmp_path):
    argv = ["serve", "--adapters", str(tmp_path), "--router", "r", "--model", "m", flag, value]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == line


HTTP = [
    ({"top_k": 2**63}, "routing.top_k must be an integer from 1 to 4 (this server's max_loras)"),
    ({"top_k": 1e30}, "routing.top_k"),
    ({"top_k": 5}, "max_loras"),
    ({"top_k": -1}, "routing.top_k"),
    ({"top_k": 0}, "routing.top_k"),
    ({"top_k": None}, "routing.top_k"),
    ({"p": math.nan}, "routing.p must be a number in (0, 1]"),
    ({"p": 1e39}, "routing.p"),
    ({"p": -0.0}, "routing.p"),
    ({"p": 0}, "routing.p"),
    ({"p": None}, "routing.p"),
    ({"p": 10**400}, "routing.p"),
    ({"base_threshold": math.inf}, "routing.base_threshold"),
    ({"base_threshold": None}, "routing.base_threshold"),
]


@pytest.mark.parametrize("routing, words", HTTP, ids=[str(r)[:30] for r, _ in HTTP])
def test_the_routed_server_answers_400_naming_the_field(routing, words):
    """The checks of tests/integrations/vllm/engine/test_security.py's BAD_ROUTING without an engine: the words its 400s carry."""
    routed = pytest.importorskip("dlplora_triton.integrations.vllm.routed", reason="vLLM's server stack")
    with pytest.raises(routed.RequestError) as info:
        routed.RoutingMiddleware._options(None, routing, 4)  # uses nothing of the instance
    assert int(info.value.status) == 400 and words in info.value.message, info.value.message
    assert info.value.param == "routing"


def test_the_routed_server_keeps_good_options():
    routed = pytest.importorskip("dlplora_triton.integrations.vllm.routed", reason="vLLM's server stack")
    options = routed.RoutingMiddleware._options(None, {"p": 1, "top_k": 4, "base_threshold": 0.5}, 4)
    assert options == {"p": 1.0, "top_k": 4, "base_threshold": 0.5}
    assert routed.RoutingMiddleware._options(None, {"adapters": ["de"]}, 4) == {}
