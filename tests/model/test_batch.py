"""The prepared batch (``ops.LoRABatch``) and the layers' one call (``ops.add_layer_delta``)."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
import torch

from dlplora_triton import batch as batch_module
from dlplora_triton import fused_lora_reference, ops
from dlplora_triton import layers as layers_module
from dlplora_triton.backends import torch_path
from dlplora_triton.layers import FixedPlan, MultiLoRALinear, PlanSource
from dlplora_triton.ops import (
    DroppedSlots,
    LoRABatch,
    LoRAStacks,
    SharedShrink,
    add_layer_delta,
    prepare_batch,
)
from dlplora_triton.plan import build_plan

K, N, L, R = 12, 10, 4, 5
PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "dlplora_triton"


def stacks(seed: int = 0, ranks=(5, 0, 3, 2), dtype=torch.float64) -> LoRAStacks:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, R, K, generator=g, dtype=dtype)
    b = torch.randn(L, R, N, generator=g, dtype=dtype).transpose(1, 2)  # [L, N, R] as the layers store it
    for i, r in enumerate(ranks):
        a[i, r:] = 0
        b[i, :, r:] = 0
    return LoRAStacks.of(a, b, ranks, [0.5 + i for i in range(L)])


def routing(seed: int = 0):
    """Four sequences of 3, 0, 2 and 4 tokens: a mix of three, an empty one, one adapter, the base."""
    offsets = torch.tensor([0, 3, 3, 5, 9])
    ids = torch.tensor([[0, 2, 3], [1, -1, -1], [2, -1, -1], [-1, -1, -1]])
    weights = torch.tensor(
        [[0.75, -0.5, 1.25], [1.0, 0.0, 0.0], [0.875, 0.0, 0.0], [0.0, 0.0, 0.0]]
    )  # float32-exact
    return offsets, ids, weights


def reference(x, s: LoRAStacks, offsets, ids, weights):
    return fused_lora_reference(
        x, s.lora_a, s.lora_b, offsets, ids, weights.double(), s.ranks, s.scales.double()
    )


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["dense", "planned"])
def test_add_layer_delta_equals_the_reference(method, monkeypatch):
    if method == "planned":  # a batch too large for the dense method: fused_lora_planned serves it
        monkeypatch.setattr(torch_path, "DENSE_MAX_TOKEN_RANKS", 1)
    s = stacks()
    offsets, ids, weights = routing()
    x = torch.randn(9, K, dtype=torch.float64)
    out = torch.randn(9, N, dtype=torch.float64)
    want = out + reference(x, s, offsets, ids, weights)
    add_layer_delta(x, out, s, prepare_batch(offsets, ids, weights, L, num_tokens=9))
    assert rel(out, want) < 1e-12


@pytest.mark.parametrize("small", [False, True], ids=["sparse-plan", "small-batch"])
def test_row_weights_replace_the_plans_and_a_route_drops_slots(small, monkeypatch):
    if not small:  # these 9 tokens are a small batch: make them a large one
        monkeypatch.setattr(batch_module, "SPARSE_MIN_TOKENS", 0)
    s = stacks(1)
    offsets, ids, weights = routing()
    batch = prepare_batch(offsets, ids, weights, L, num_tokens=9)
    assert batch.keeps_dropped_slots == small
    x = torch.randn(9, K, dtype=torch.float64)
    gated = weights * torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    dropped = (gated == 0) & (ids >= 0)
    slots = DroppedSlots(tuple(int(i) for i in dropped.reshape(-1).nonzero()), dropped, 0b1001)
    variant = batch.dropping(slots)
    assert batch.dropping(slots) is variant  # built once per key
    if small:  # the dropped slots stay, at weight 0 in the row weights
        assert variant is batch
    else:
        assert variant.sparse and variant.root is batch
        assert torch.equal(variant.plan.seq_adapter, ids.masked_fill(dropped, -1))
    out = torch.zeros(9, N, dtype=torch.float64)
    add_layer_delta(x, out, s, variant, row_weights=gated)
    assert rel(out, reference(x, s, offsets, ids, gated)) < 1e-12


def test_a_shared_shrink_serves_each_member_once_per_input(monkeypatch):
    members = [stacks(seed) for seed in (2, 3, 4)]
    stacked = torch.cat([m.lora_a for m in members], dim=1)
    group = object()
    shares = [SharedShrink(group, 3, i, i * R, stacked) for i in range(3)]
    offsets, ids, weights = routing()
    batch = prepare_batch(offsets, ids, weights, L, num_tokens=9)
    calls = []
    real = torch_path.shrink_shared
    monkeypatch.setattr("dlplora_triton.batch.shrink_shared", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(9, K, dtype=torch.float64)
    for forward in range(2):
        for m, share in zip(members, shares):
            out = torch.zeros(9, N, dtype=torch.float64)
            add_layer_delta(x, out, m, batch, share=share)
            assert rel(out, reference(x, m, offsets, ids, weights)) < 1e-12
        # A new forward with the same tensor: every member was served, so the shrink runs again.
        assert len(calls) == forward + 1
    other = torch.randn(9, K, dtype=torch.float64)
    out = torch.zeros(9, N, dtype=torch.float64)
    add_layer_delta(other, out, members[1], batch, share=shares[1])  # another input: a shrink of its own
    assert len(calls) == 3 and rel(out, reference(other, members[1], offsets, ids, weights)) < 1e-12


def test_fused_lora_planned_takes_a_batch():
    s = stacks(5)
    offsets, ids, weights = routing()
    x = torch.randn(9, K, dtype=torch.float64)
    batch = prepare_batch(offsets, ids, weights, L, num_tokens=9)
    got = ops.fused_lora_planned(x, s.lora_a, s.lora_b, batch, s.ranks, s.scales)
    assert rel(got, reference(x, s, offsets, ids, weights)) < 1e-12
    with pytest.raises(TypeError, match="LoRAPlan"):
        LoRABatch("not a plan")


def test_sources_hand_out_one_batch():
    offsets, ids, weights = routing()
    plan = build_plan(offsets, ids, weights, L, num_tokens=9)
    fixed = FixedPlan(plan)
    x = torch.zeros(9, K)
    assert fixed.batch(x) is fixed.batch(x) and fixed.batch(x).plan is plan
    assert fixed.layer_batch(x, None, 0b1) is fixed.batch(x)

    class PlanOnly(PlanSource):  # a source written against plan_for alone still serves layers
        adapter_mask, active = -1, True

        def plan_for(self, x):
            return plan

    source = PlanOnly()
    assert source.batch(x) is source.batch(x) and source.batch(x).plan is plan
    idle = DroppedSlots((), torch.zeros(4, 3, dtype=torch.bool), 0)
    assert source.layer_batch(x, idle, -1) is None  # every row dropped this layer's adapters


def test_moved_names_warn_and_still_work():
    for name in ("shrink_shared", "expand_shared", "dense_layer_delta"):
        with pytest.warns(DeprecationWarning, match=f"ops.{name} is deprecated"):
            assert getattr(ops, name) is getattr(torch_path, name)
    offsets, ids, weights = routing()
    fixed = FixedPlan(build_plan(offsets, ids, weights, L, num_tokens=9))
    with pytest.warns(DeprecationWarning, match="batch_for is deprecated"):
        plan, host = fixed.batch_for(torch.zeros(9, K))
    assert plan is fixed.plan and host is fixed.prepared.host
    layer = MultiLoRALinear.from_factors(
        torch.nn.Linear(K, N), [None, (torch.ones(2, K), torch.ones(N, 2), 1.0)]
    )
    with pytest.warns(DeprecationWarning, match="use dropped_slots"):
        assert layer.route is None
    for module in (batch_module, ops, layers_module):
        with pytest.warns(
            DeprecationWarning,
            match="ModuleRoute is deprecated: it moved to dlplora_triton.batch.DroppedSlots",
        ):
            assert module.ModuleRoute is DroppedSlots
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.add_layer_delta  # noqa: B018  (the new names do not warn)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ops.nothing  # noqa: B018


def _imports(path: pathlib.Path) -> set[str]:
    """Modules of the package that ``path`` imports (absolute names), function-level imports included."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rpartition(".")[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            name = node.module or ""
            full = f"{base}.{name}".strip(".") if node.level else name
            found.add(full)
            found.update(f"{full}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_only_ops_reaches_below_the_batch():
    """backends/ is reached through ops and the batch only: layers, patch, gates, MiLoRA and the vLLM
    wrapper receive a prepared batch and never import the PyTorch path themselves."""
    allowed = {"ops.py", "batch.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel_path = path.relative_to(PACKAGE)
        if rel_path.parts[0] in ("backends", "demo") or rel_path.as_posix() in allowed:
            continue
        if any(name.startswith("dlplora_triton.backends") for name in _imports(path)):
            offenders.append(rel_path.as_posix())
    assert offenders == []
