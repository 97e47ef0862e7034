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
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_kernels_import_only_torch_triton_and_themselves():
    for path in (ROOT / "kernels").glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert name.startswith(".") or top in {"torch", "triton", "__future__"}, (
                f"{path.name} imports {name}"
            )


def test_ops_and_plan_never_import_upwards():
    upper = {"layers", "patch", "router", "generation", "adapters", "cli", "dynamic"}
    for module in ("ops.py", "plan.py", "reference.py"):
        for name in _imports(ROOT / "dlplora_triton" / module):
            assert name.lstrip(".").split(".")[-1] not in upper, f"{module} imports {name}"
            assert "transformers" not in name, f"{module} imports {name}"
