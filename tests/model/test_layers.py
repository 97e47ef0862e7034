"""MultiLoRALinear: wraps Linear / Conv1D in place, stacks adapters, adds the fused delta of a plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # noqa: E402

from dlplora_triton import fused_lora_planned, fused_lora_reference
from dlplora_triton import layers as layers_module
from dlplora_triton.layers import FixedPlan, MultiLoRALinear, PlanSource, stack_factors
from dlplora_triton.plan import build_plan

K, N = 12, 10


def factors_for(ranks: list[int], K: int = K, N: int = N, seed: int = 0):
    """Random (A, B, scale) per adapter; rank 0 -> None (the adapter does not adapt this layer)."""
    g = torch.Generator().manual_seed(seed)
    return [
        None if r == 0 else (torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 0.5 + i)
        for i, r in enumerate(ranks)
    ]


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(K, N)
    if kind == "linear-nobias":
        return nn.Linear(K, N, bias=False)
    conv = Conv1D(N, K)  # nf = out, nx = in: weight [K, N]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return conv


def routing(seq_lens: list[int], rows: list[list[tuple[int, float]]]):
    """seq_offsets, adapter_ids, adapter_weights for rows of (adapter id, weight)."""
    P = max(1, max(map(len, rows)))
    ids = torch.full((len(rows), P), -1)
    weights = torch.zeros(len(rows), P)
    for s, row in enumerate(rows):
        for p, (i, w) in enumerate(row):
            ids[s, p], weights[s, p] = i, w
    offsets = torch.zeros(len(seq_lens) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
    return offsets, ids, weights


def expected(base, x2d, factors, offsets, ids, weights):
    """base(x) + the reference delta, in float64."""
    a, b, ranks, scales = stack_factors(factors, K, N, torch.float64, "cpu")
    delta = fused_lora_reference(
        x2d.double(), a, b, offsets, ids, weights.double(), torch.tensor(ranks), torch.tensor(scales)
    )
    return base(x2d) + delta.to(x2d.dtype)


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
def test_forward_adds_each_rows_mix(kind):
    base = make_base(kind)
    factors = factors_for([3, 0, 5, 1])
    offsets, ids, weights = routing([4, 4, 4], [[(0, 0.7), (2, -0.3)], [], [(1, 1.0), (3, 2.0), (2, 0.5)]])
    plan = build_plan(offsets, ids, weights, 4, num_tokens=12)
    layer = MultiLoRALinear.from_factors(base, factors, FixedPlan(plan))
    x = torch.randn(3, 4, K)
    got = layer(x)
    assert got.shape == (3, 4, N)
    want = expected(base, x.reshape(-1, K), factors, offsets, ids, weights).reshape(3, 4, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Packed 2-D input with sequences of different lengths (one empty).
    offsets, ids, weights = routing([2, 0, 5], [[(2, 1.0)], [(0, 1.0)], [(0, -1.0), (3, 0.25)]])
    layer.plan_source = FixedPlan(build_plan(offsets, ids, weights, 4, num_tokens=7))
    x = torch.randn(7, K)
    torch.testing.assert_close(
        layer(x), expected(base, x, factors, offsets, ids, weights), rtol=1e-5, atol=1e-5
    )


def test_wraps_without_copying_the_base_weight():
    base = make_base("conv1d")
    layer = MultiLoRALinear.from_factors(base, factors_for([2, 3]))
    assert layer.base is base
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (K, N)
    assert [name for name, _ in layer.named_parameters()] == ["base.weight", "base.bias"]
    assert not layer.state_dict().keys() - {"base.weight", "base.bias"}  # stacks are non-persistent buffers


def test_stacks_layout_ranks_and_scales():
    factors = factors_for([3, 0, 5])
    layer = MultiLoRALinear.from_factors(make_base("linear"), factors)
    assert layer.lora_a.shape == (3, 5, K) and layer.lora_b.shape == (3, N, 5)
    assert layer.ranks.tolist() == [3, 0, 5] and layer.ranks.dtype == torch.int32
    assert layer.scales.tolist() == [0.5, 0.0, 2.5] and layer.scales.dtype == torch.float32
    assert torch.equal(layer.lora_a[0, :3], factors[0][0]) and torch.equal(
        layer.lora_b[0, :, :3], factors[0][1]
    )
    assert not layer.lora_a[0, 3:].any() and not layer.lora_b[0, :, 3:].any() and not layer.lora_a[1].any()
    for got, want in zip(layer.factors(), factors):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert "ranks=[3,0,5]" in repr(layer)


class CountingSource(PlanSource):
    def __init__(self, plan, mask):
        self.plan, self.adapter_mask, self.calls = plan, mask, 0

    def plan_for(self, x):
        self.calls += 1
        return self.plan


def test_idle_layer_returns_base_output_without_lora_work(monkeypatch):
    base = make_base("linear")
    layer = MultiLoRALinear.from_factors(base, factors_for([0, 2, 0]))  # only adapter 1 adapts this layer

    def fail(*args, **kwargs):
        raise AssertionError("add_layer_delta must not run")

    monkeypatch.setattr(layers_module, "add_layer_delta", fail)
    x = torch.randn(2, 3, K)
    assert torch.equal(layer(x), base(x))  # no plan source
    offsets, ids, weights = routing([3, 3], [[(0, 1.0)], [(2, 1.0)]])
    plan = build_plan(offsets, ids, weights, 3, num_tokens=6)
    for mask in (0, 0b101):  # nothing selected; only adapters the layer does not have
        layer.plan_source = CountingSource(plan, mask)
        assert torch.equal(layer(x), base(x))
        assert layer.plan_source.calls == 0


def test_follows_the_base_dtype_and_moves_with_to():
    base = make_base("linear").to(torch.float16)
    layer = MultiLoRALinear.from_factors(base, factors_for([2, 4]))
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float16
    layer = layer.to(torch.float64)
    assert layer.lora_a.dtype == layer.lora_b.dtype == layer.weight.dtype == torch.float64
    assert layer.ranks.dtype == torch.int32
    offsets, ids, weights = routing([2, 3], [[(0, 1.0), (1, 0.5)], [(1, -1.0)]])
    layer.plan_source = FixedPlan(build_plan(offsets, ids, weights, 2, num_tokens=5))
    x = torch.randn(5, K, dtype=torch.float64)
    a, b = layer.lora_a, layer.lora_b
    delta = fused_lora_reference(x, a, b, offsets, ids, weights.double(), layer.ranks, layer.scales.double())
    torch.testing.assert_close(layer(x), layer.base(x) + delta, rtol=1e-10, atol=1e-10)


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="Embedding"):
        MultiLoRALinear.from_factors(nn.Embedding(4, K), [None])
    with pytest.raises(ValueError, match=r"adapter 1: A \[2, 11\]"):
        stack_factors([None, (torch.randn(2, K - 1), torch.randn(N, 2), 1.0)], K, N, torch.float32, "cpu")
    layer = MultiLoRALinear.from_factors(make_base("linear"), factors_for([2, 3]))
    with pytest.raises(ValueError, match="lora_b must be"):
        layer.set_stacks(torch.zeros(2, 3, K), torch.zeros(2, N, 4), [1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="ranks must lie in 0..R"):
        layer.set_stacks(torch.zeros(2, 3, K), torch.zeros(2, N, 3), [1, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match="L = 2 entries"):
        layer.set_stacks(torch.zeros(2, 3, K), torch.zeros(2, N, 3), [1], [1.0, 1.0])
    offsets, ids, weights = routing([2], [[(0, 1.0)]])
    layer.plan_source = FixedPlan(build_plan(offsets, ids, weights, 2, num_tokens=2))
    with pytest.raises(ValueError, match="T = 2 tokens but x has 3"):
        layer(torch.randn(3, K))


@pytest.mark.interpreter
def test_layer_stacks_run_in_the_triton_kernels():
    """The stacks (lora_b stored transposed) go through the Triton kernels as they are."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    factors = factors_for([3, 0, 5])
    a, b, ranks, scales = stack_factors(factors, K, N, torch.float32, device)
    offsets, ids, weights = routing([2, 1, 3], [[(0, 0.5), (2, 1.0)], [], [(2, -1.0)]])
    plan = build_plan(offsets.to(device), ids.to(device), weights.to(device), 3, num_tokens=6)
    x = torch.randn(6, K, device=device)
    r, s = torch.tensor(ranks, device=device), torch.tensor(scales, device=device)
    got = fused_lora_planned(x, a, b, plan, ranks=r, scales=s, backend="triton")
    want = fused_lora_planned(x, a, b.contiguous(), plan, ranks=r, scales=s, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
