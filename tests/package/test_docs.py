"""The docs run: every code block of README.md and docs/*.md is marked, and what it claims is checked.

Each block has an HTML comment on the line before it (a blank line between is allowed):

- ``<!-- doctest: run -->``: Python is executed; shell lines are run (``dlplora ...`` through the
  command's ``main``), in a scratch folder that mirrors the checkout (so ``router/`` or ``mi/`` land
  there). ``run setup=NAME`` first defines the names the block leaves to the reader (``model``,
  ``texts``, ``input_ids``, ... below). Placeholders are resolved: ``"adapters/<task>"`` to the shipped
  SmolLM2 adapter of that task, ``<SmolLM2 folder>`` / ``<model dir>`` / ``MODEL_DIR`` to the converted
  SmolLM2 folder, ``$(dlplora data --path NAME)`` to what that command prints.
- ``<!-- doctest: import (why) -->``: needs a GPU, a vLLM engine or a server. Python must compile and
  its ``dlplora_triton`` imports must resolve (other modules must at least be installed, vLLM and the
  OpenAI client excepted); ``dlplora`` shell lines must name a subcommand and only its options.
- ``<!-- doctest: usage -->``: a command synopsis or install line: ``dlplora`` lines as above, ``make``
  targets must exist in the Makefile, scripts named must exist.
- ``<!-- doctest: text (why) -->``: not code (math, diagrams, data layouts).

Apart from the blocks, every repository path, ``dlplora`` subcommand and ``make`` target the docs name
must exist.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- doctest: (run|import|usage|text)\b(.*?)-->\s*$")
OPTIONAL_MODULES = {"vllm", "openai"}  # blocks needing them are marked import; not installed everywhere


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the block's first code line
    lang: str  # "python", "bash", "toml", ... ("" for an indented block)
    code: str
    kind: str | None
    args: str

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0

    def marker(before: int):
        j = before - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        found = MARKER.match(lines[j]) if j >= 0 else None
        return (found.group(1), found.group(2).strip()) if found else (None, "")

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = i + 1
            while not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(doc, i + 2, line[3:].strip(), "\n".join(lines[i + 1 : end]), *marker(i)))
            i = end + 1
        elif (
            line.startswith("    ")
            and line.strip()
            and (i == 0 or not lines[i - 1].strip() or MARKER.match(lines[i - 1]))
        ):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if prev.lstrip().startswith(("-", "*", "|")) or re.match(r"\s*\d+\.", prev):
                i += 1  # a list item's continuation, not code
                continue
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            code = "\n".join(x[4:] for x in lines[i:end]).strip("\n")
            blocks.append(Block(doc, i + 1, "", code, *marker(i)))
            i = end
        else:
            i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in _blocks(doc)]


def test_every_code_block_is_marked():
    unmarked = [b.id for b in BLOCKS if b.kind is None]
    assert not unmarked, (
        f"code blocks without a <!-- doctest: run|import|usage|text --> line before them: {unmarked}"
    )
    assert len(BLOCKS) >= 25  # the parser found the blocks (README and docs together)


def _blocks_of(*kinds):
    return pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in kinds], ids=lambda b: b.id)


# -- shell lines -----------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        for part in re.split(r"\s&&\s", line):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


def _dlplora_parsers() -> dict[str, argparse.ArgumentParser]:
    from dlplora_triton.cli import _build_parser

    (sub,) = [a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.M)}


def _check_command(words: list[str]) -> None:
    """A command a doc shows: a dlplora subcommand with only its options, a make target, a script."""
    program = words[0].removeprefix(".venv/bin/")
    if program == "dlplora":
        parsers = _dlplora_parsers()
        assert len(words) > 1 and words[1] in parsers, f"no subcommand `dlplora {words[1:2]}`"
        if words[1] == "serve":  # options it does not know go to vLLM's server
            known = {o for a in parsers["serve"]._actions for o in a.option_strings}
            given = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
            assert {"--adapters", "--router"} <= given, words
            return
        known = {o for a in parsers[words[1]]._actions for o in a.option_strings}
        for word in words[2:]:
            word = word.strip("[]").split("=")[0]
            if word.startswith("--"):
                assert word in known, f"`dlplora {words[1]}` has no option {word}"
    elif program == "make":
        for target in words[1:]:
            assert target in _make_targets(), f"no make target {target!r}"
    elif program in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"no script {words[1]}"


@_blocks_of("usage", "import")
def test_commands_and_imports_of_blocks_that_do_not_run(block):
    if block.lang == "python":
        tree = ast.parse(block.code, filename=block.id)  # compiles
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                _check_import(node.module, [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    _check_import(alias.name, [])
        return
    for words in _commands(block.code):
        _check_command(words)


def _check_import(module: str, names: list[str]) -> None:
    top = module.split(".")[0]
    if top == "dlplora_triton":
        imported = importlib.import_module(module)
        missing = [n for n in names if not hasattr(imported, n)]
        assert not missing, f"{module} has no {missing}"
    elif top not in OPTIONAL_MODULES:
        assert importlib.util.find_spec(top) is not None, f"{module} is not installed"


# -- running blocks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    from dlplora_triton.demo.smollm2 import smollm2_folder

    return smollm2_folder()


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A working folder that looks like the checkout (its top-level entries linked), for relative paths."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _resolve(code: str, model_folder: Path) -> str:
    from dlplora_triton.commands.data import path_of
    from dlplora_triton.demo.tasks import ADAPTERS_DIR, TASKS

    code = re.sub(r"\$\(dlplora data --path ([\w-]+)\)", lambda m: str(path_of(m.group(1))), code)

    for task in TASKS:
        code = code.replace(f'"adapters/{task}"', repr(str(ADAPTERS_DIR / task)))
    for placeholder in ("<SmolLM2 folder>", "<model dir>", "MODEL_DIR"):
        code = code.replace(placeholder, str(model_folder))
    assert "adapters/" not in code.replace("data/adapters/", ""), f"an unresolved adapter path in:\n{code}"
    return code


def _setup(name: str, model_folder: Path) -> dict:
    """The names a block leaves to the reader."""
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dlplora_triton.demo.tasks import load_texts, task_split

        model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        train, held = task_split(*load_texts())
        texts = train["de"][:200] + train["code"][:200]
        tasks = ["de"] * 200 + ["code"] * 200
        prompts = [held["de"][0], held["code"][0], "hello, how are you?"]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        return {
            "model": model,
            "tokenizer": tokenizer,
            "texts": texts,
            "tasks": tasks,
            "prompts": prompts,
            "input_ids": batch["input_ids"],
            "mask": batch["attention_mask"],
            "prompt_ids": batch["input_ids"][:1],
        }
    if name == "plan":
        import dlplora_triton as dlp

        torch.manual_seed(0)
        L, T, K, N, R = 3, 5, 64, 32, 8

        class Layer:
            def __init__(self):
                self.base = torch.nn.Linear(K, N)
                self.lora_a, self.lora_b = torch.randn(L, R, K), torch.randn(L, N, R)
                self.ranks, self.scales = torch.tensor([8, 4, 2]), torch.tensor([2.0, 1.0, 0.5])

        return {
            "dlp": dlp,
            "seq_offsets": torch.tensor([0, 2, 5]),
            "adapter_ids": torch.tensor([[2, -1], [0, 2]]),
            "adapter_weights": torch.tensor([[1.0, 0.0], [0.7, 0.3]]),
            "L": L,
            "T": T,
            "x": torch.randn(T, K),
            "adapted_layers": [Layer(), Layer()],
        }
    if name == "dynamic":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=2,
            )
        )
        data = [
            {"input_ids": torch.randint(1, 100, (4, 10)), "labels": torch.randint(0, 2, (4,))}
            for _ in range(6)
        ]
        return {"model": model, "data": data, "steps": len(data)}
    raise AssertionError(f"unknown setup {name!r}")


@_blocks_of("run")
def test_blocks_that_say_they_run_do(block, scratch, smollm2_folder, monkeypatch):
    setup = re.search(r"setup=(\w+)", block.args)
    if block.lang == "python":
        namespace = _setup(setup.group(1), smollm2_folder) if setup else {}
        namespace["__name__"] = "__doctest__"
        code = compile(_resolve(block.code, smollm2_folder), block.id, "exec")
        with torch.random.fork_rng(devices=[]):
            exec(code, namespace)
        return
    assert not setup, "shell blocks take no setup"
    from dlplora_triton.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    for words in _commands(_resolve(block.code, smollm2_folder)):
        _check_command(words)
        assert words[0] == "dlplora", f"{block.id}: only dlplora commands run here, got {words[0]!r}"
        with contextlib.redirect_stdout(None):
            assert main(words[1:]) == 0, f"{block.id}: `{shlex.join(words)}` failed"


# -- names in the prose --------------------------------------------------------------------------------

PATH = re.compile(
    r"(?<![\w/.~<-])((?:dlplora_triton|bench|tests|docs|kernels|requirements)/[\w./-]*[\w/])(?![\w<*{])"
)
MODULE_FILE = re.compile(r"(?<![\w/.-])(\w[\w-]*\.(?:py|md|sh))(?![\w/])")


def _tracked() -> set[str]:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return set(files)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_path_command_and_target_a_doc_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    tracked = _tracked()
    basenames = {Path(f).name for f in tracked}
    missing = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if path.startswith("bench/results/<"):
            continue
        if not ((ROOT / path).exists() or (doc.parent / path).exists()):
            missing.append(path)
    for match in MODULE_FILE.finditer(text):
        if match.group(1) not in basenames:
            missing.append(match.group(1))
    for target in re.findall(r"`make ([\w-]+)", text) + re.findall(r"^\s*make ([\w-]+)", text, re.M):
        if target not in _make_targets():
            missing.append(f"make {target}")
    parsers = _dlplora_parsers()
    for command in re.findall(r"(?:`|^\s*(?:\.venv/bin/)?)dlplora ([a-z][\w-]*)", text, re.M):
        if command not in parsers and command not in ("demo", "serve"):
            missing.append(f"dlplora {command}")
    assert not missing, f"{doc.name} names what does not exist: {sorted(set(missing))}"
