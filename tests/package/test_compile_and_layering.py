"""torch.compile traces the op without graph breaks; the package keeps the layering of DESIGN.md, has no
import cycle and no file over 600 lines."""

import ast
from pathlib import Path

import pytest
import torch
from lora_cases import Case, make_inputs, reference_delta, rel_error

import dlplora_triton as dlp

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    inputs = make_inputs(Case("compile", [3, 0, 4], P=2, L=3, K=16, N=8, R=4, ranks=[4, 2, 3]))

    def layer(x, a, b, offsets, ids, weights, ranks, scales):
        base = torch.tanh(x) @ torch.ones(x.shape[1], b.shape[1])
        return dlp.fused_lora(x, a, b, offsets, ids, weights, ranks, scales, out=base) * 2

    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    args = [
        inputs[k]
        for k in ("x", "lora_a", "lora_b", "seq_offsets", "adapter_ids", "adapter_weights", "ranks", "scales")
    ]
    expected = layer(*args)
    got = compiled(*args)
    assert torch.allclose(got, expected, atol=1e-5)
    base = torch.tanh(inputs["x"]) @ torch.ones(16, 8)
    assert rel_error(got / 2 - base, reference_delta(inputs)) < 1e-5


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as written (relative ones keep their dots); ``from X import n``
    also yields ``X.n`` (n may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            sep = "." if node.module else ""
            names.update(base + sep + alias.name for alias in node.names)
    return names


def _package_modules(path: Path, package: Path = ROOT / "dlplora_triton") -> set[str]:
    """The first names under the package (``plan``, ``backends``, ``routing``) that ``path`` imports,
    relative imports resolved from the file's folder."""
    folder = list(path.relative_to(package).parts[:-1])
    found = set()
    for name in _imports(path):
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            full = folder[: len(folder) - (level - 1)] + [p for p in name.lstrip(".").split(".") if p]
        elif name.startswith(package.name + "."):
            full = name.split(".")[1:]
        else:
            continue
        if full:
            found.add(full[0])
    return found


def _files(*names: str) -> list[Path]:
    """Package files of the given modules or subpackages (missing ones are skipped)."""
    package = ROOT / "dlplora_triton"
    files = []
    for name in names:
        if (package / name).is_dir():
            files += sorted((package / name).rglob("*.py"))
        elif (package / f"{name}.py").is_file():
            files.append(package / f"{name}.py")
    return files


def test_kernels_import_only_torch_triton_and_themselves():
    files = list((ROOT / "kernels").glob("*.py"))
    assert files, "kernels/ holds the Triton kernels"
    # kernels/__init__.py also holds the guard that keeps the folder from shadowing another `kernels`
    # when the checkout's root is on sys.path; it needs the standard library's import machinery.
    guard = {"importlib", "os", "sys"}
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            allowed = {"torch", "triton", "__future__"} | (guard if path.name == "__init__.py" else set())
            assert name.startswith(".") or top in allowed, f"{path.name} imports {name}"


SERVING = {"layers", "patch", "ops", "plan", "backends", "generation", "selection", "adapters", "milora"}
# (what, the modules that must not import it): DESIGN.md section 4, data flowing one way.
RULES = [
    (
        ("ops",),
        {"layers", "patch", "routing", "router", "generation", "adapters", "cli", "finetune", "dynamic"},
    ),
    (
        ("plan", "reference"),
        {"layers", "patch", "routing", "router", "generation", "adapters", "ops", "backends"},
    ),
    (("backends",), {"layers", "patch", "routing", "router", "generation", "adapters", "ops"}),
    (("layers",), {"patch", "routing", "router", "adapters", "generation"}),
    (("routing", "router"), SERVING),
]


@pytest.mark.parametrize(
    "modules,forbidden", RULES, ids=lambda v: "+".join(v) if isinstance(v, tuple) else ""
)
def test_package_layering(modules, forbidden):
    files = _files(*modules)
    assert files, f"no package file for {modules}"
    for path in files:
        bad = _package_modules(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        names = _imports(path)
        if modules[0] in ("ops", "plan", "backends"):
            assert not any("transformers" in n for n in names), (
                f"{path.relative_to(ROOT)} imports transformers"
            )


def test_layering_check_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: a file importing upwards in each spelling is caught."""
    package = tmp_path / "dlplora_triton"
    (package / "backends").mkdir(parents=True)
    probe = package / "backends" / "probe.py"
    probe.write_text(
        "from ..layers import MultiLoRALinear\nimport dlplora_triton.patch\nfrom .. import routing\n"
    )
    assert _package_modules(probe, package) == {"layers", "patch", "routing"}
    probe.write_text("from .torch_path import fused_lora_torch\nfrom ..plan import LoRAPlan\nimport torch\n")
    assert _package_modules(probe, package) == {"backends", "plan"}


# -- import cycles and file sizes (issue 26) --------------------------------------------------------

PACKAGE = ROOT / "dlplora_triton"
MAX_LINES = 600
# Package files allowed over MAX_LINES, with their line count when listed (remove an entry once its file
# is split; a listed file must not grow). None today.
OVERSIZE: dict[str, int] = {}


def _module_name(path: Path, package: Path) -> str:
    """``routing.router`` for dlplora_triton/routing/router.py, ``routing`` for its ``__init__.py``."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(parts: list[str], package: Path) -> bool:
    here = package.joinpath(*parts)
    return bool(parts) and (here.with_suffix(".py").is_file() or (here / "__init__.py").is_file())


def _module_imports(path: Path, package: Path, type_checking: bool = False) -> set[str]:
    """The package modules ``path`` imports, by :func:`_module_name`: every import statement in the
    file, at module level and inside functions and methods (a function-level import is still an
    arrow: it runs whenever the function does); those under ``if TYPE_CHECKING:`` (annotations only,
    never run) only with ``type_checking``.
    ``from X import n`` is an import of the module ``X.n`` when that is a module, else of ``X``.
    Importing ``a.b`` also runs the package ``a``'s ``__init__``; that arrow is not counted (every
    subpackage whose ``__init__`` re-exports its modules would be a cycle)."""
    folder = list(path.relative_to(package).parts[:-1])
    found = set()

    def add(base: list[str], names: list[str]) -> None:
        subs = [base + [n] for n in names if _is_module(base + [n], package)]
        found.update(".".join(s) for s in subs)
        if len(subs) < len(names) or not names:
            found.add(".".join(base))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not type_checking and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name:
                        add(parts[1:], [])
            elif isinstance(child, ast.ImportFrom):
                module = [p for p in (child.module or "").split(".") if p]
                if child.level:
                    add(folder[: len(folder) - (child.level - 1)] + module, [a.name for a in child.names])
                elif module and module[0] == package.name:
                    add(module[1:], [a.name for a in child.names])
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _package_files(package: Path) -> list[Path]:
    """The package's own .py files; not those of ``kernels`` (a symlink to the top-level kernels/ in a
    checkout, which imports only torch, triton and itself: see the test above)."""
    return sorted(p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "kernels")


def _import_graph(package: Path = PACKAGE, type_checking: bool = False) -> dict[str, set[str]]:
    files = _package_files(package)
    modules = {_module_name(p, package) for p in files}
    return {_module_name(p, package): _module_imports(p, package, type_checking) & modules for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module, and
    modules importing themselves, each sorted (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        cycles.append(sorted(component))
    return sorted(cycles)


def test_no_import_cycles():
    """Imports between the package's modules point one way (function-level imports included): no
    module imports, directly or through others, one that imports it back."""
    graph = _import_graph()
    assert {"routing.router", "routing.train", "milora.model", "patch"} <= set(graph)
    assert "routing.net" in graph["routing.train"] and "routing.train" in graph["routing.router"]
    assert _cycles(graph) == [], "import cycles in dlplora_triton (module -> ... -> itself)"


# Cycles that close only through ``if TYPE_CHECKING:`` imports (annotations; nothing runs them). Known:
# finetune's callback.py and export.py annotate with dynamic.py's DynamicLoRA, which imports both.
KNOWN_TYPE_CHECKING_CYCLES = [["finetune.callback", "finetune.dynamic", "finetune.export"]]


def test_no_new_cycles_through_type_checking_imports():
    """Counting ``if TYPE_CHECKING:`` imports too, the only cycles are the known ones (listed above;
    a cycle in that list may shrink or go, a new one fails)."""
    cycles = _cycles(_import_graph(type_checking=True))
    new = [c for c in cycles if not any(set(c) <= set(known) for known in KNOWN_TYPE_CHECKING_CYCLES)]
    assert not new, f"new import cycles through TYPE_CHECKING imports: {new}"


def test_cycle_check_sees_every_spelling(tmp_path):
    """The checker itself: cycles through relative, absolute and function-level imports are found;
    ``if TYPE_CHECKING:`` imports and a package's ``__init__`` run by a submodule import are not arrows."""
    package = tmp_path / "dlplora_triton"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .sub import a\n",
        "sub/__init__.py": "from .a import A\nfrom .b import B\n",
        "sub/a.py": "from . import b\nA = 1\n",
        "sub/b.py": "def f():\n    from dlplora_triton.sub.a import A\n    return A\nB = 2\n",
        "c.py": "import dlplora_triton.d\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n",
        "e.py": "from . import e\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = _import_graph(package)
    assert graph["sub.a"] == {"sub.b"} and graph["sub.b"] == {"sub.a"} and graph["d"] == set()
    assert graph[""] == {"sub.a"} and graph["c"] == {"d"}
    assert _import_graph(package, type_checking=True)["d"] == {"c"}
    assert _cycles(graph) == [["e"], ["sub.a", "sub.b"]]
    (package / "sub/b.py").write_text("B = 2\n")
    assert _cycles(_import_graph(package)) == [["e"]]


def test_no_package_file_over_600_lines():
    """Every file of the package (kernels/ included) is at most MAX_LINES lines; OVERSIZE lists the
    exceptions, each at most the line count it was listed with."""
    files = _package_files(PACKAGE) + sorted((ROOT / "kernels").glob("*.py"))
    too_long = {}
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > OVERSIZE.get(name, MAX_LINES):
            too_long[name] = lines
    assert not too_long, f"files over {MAX_LINES} lines (split them along a seam): {too_long}"
    stale = [name for name in OVERSIZE if not (ROOT / name).is_file()]
    assert not stale, f"OVERSIZE lists files that no longer exist: {stale}"
