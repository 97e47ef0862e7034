"""torch.compile traces the op without graph breaks; the package keeps the layering of DESIGN.md."""

import ast
from pathlib import Path

import pytest
import torch
from lora_cases import Case, make_inputs, reference_delta, rel_error

import dlplora_triton as dlp

ROOT = Path(__file__).resolve().parents[1]


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
