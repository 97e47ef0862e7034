"""fused_lora (both backends) against the float64 reference, on random data with odd shapes."""

import pytest
import torch
from dlplora_triton.kernels import expand_config, lora_expand_launch, lora_shrink_launch, shrink_config
from lora_cases import Case, make_inputs, reference_delta, rel_error

import dlplora_triton as dlp

pytestmark = pytest.mark.interpreter

CASES = [
    Case("decode_odd_K67_N45", [1, 1, 1, 1, 1], P=3, L=6, K=67, N=45, R=16, ranks=[1, 16, 7, 0, 12, 5]),
    Case("prefill_empty_seqs_R64", [0, 17, 3, 0, 40], P=2, L=5, K=33, N=70, R=64, ranks=[64, 1, 33, 17, 48]),
    Case("shared_adapter_L64", [1] * 12, P=1, L=64, K=40, N=24, R=8, empty_slot_frac=0.0, shared_adapter=3),
    Case("p4_repeat_in_row", [3, 5, 2], P=4, L=7, K=50, N=36, R=16, repeat_in_row=True),
    Case("many_adapters_L64", [2] * 20, P=2, L=64, K=24, N=20, R=16, empty_slot_frac=0.1),
    Case("p1_no_ranks", [9, 1, 30], P=1, L=3, K=45, N=129, R=4, empty_slot_frac=0.0),
    Case("padded_16x8_seq_bmm", [16] * 8, P=2, L=6, K=40, N=33, R=16, ranks=[16, 2, 0, 7, 16, 11]),
    Case("long_K_split", [1, 1, 2], P=2, L=4, K=1100, N=40, R=16, ranks=[16, 3, 9, 11], empty_slot_frac=0.0),
]

# (dtype, max relative error): fp32 products are exact IEEE (no tf32) and summed in fp32; fp16
# rounds the inputs of both dots (v is cast to fp16 before the expand dot, as in Punica/vLLM).
DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.float16, 1e-2, id="fp16")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, tol, backend):
    inputs = make_inputs(case, dtype)
    ref = reference_delta(inputs)
    y = dlp.fused_lora(**inputs, backend=backend)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_error(y, ref) < tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_out_is_added_into_in_place(case, backend):
    inputs = make_inputs(case)
    base = torch.randn(inputs["x"].shape[0], inputs["lora_b"].shape[1])
    out = base.clone()
    y = dlp.fused_lora(**inputs, out=out, backend=backend)
    assert y is out
    assert rel_error(out - base, reference_delta(inputs)) < 1e-5


def test_float64_torch_backend_is_exact():
    inputs = make_inputs(CASES[1], torch.float64)
    assert rel_error(dlp.fused_lora(**inputs, backend="torch"), reference_delta(inputs)) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_never_read_unwritten_workspace(case):
    """Shrink + expand launched by hand with the workspace and the output poisoned with NaN."""
    inputs = make_inputs(case)
    x, a, b = inputs["x"], inputs["lora_a"], inputs["lora_b"]
    L, R, K = a.shape
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], L)
    ranks = None if inputs["ranks"] is None else inputs["ranks"].to(torch.int32)
    s_cfg = shrink_config(plan.shrink_tile_start.numel(), K, R, x.dtype)
    e_cfg = expand_config(plan.expand_tile_count.numel(), b.shape[1], R, x.dtype)
    v = torch.full((s_cfg["SPLIT_K"], plan.num_tokens * plan.num_slots, R), float("nan"))
    out = torch.zeros(plan.num_tokens, b.shape[1])
    lora_shrink_launch(
        x,
        a,
        v,
        plan.sorted_rows,
        plan.shrink_tile_adapter,
        plan.shrink_tile_start,
        plan.shrink_tile_end,
        plan.token_weight.view(-1),
        ranks,
        inputs["scales"],
        plan.num_slots,
        plan.shrink_block_m,
        s_cfg,
    )
    lora_expand_launch(
        v,
        b,
        out,
        plan.token_adapter,
        plan.expand_tile_count,
        plan.expand_tile_adapters,
        ranks,
        plan.expand_block_m,
        e_cfg,
    )
    assert torch.isfinite(out).all()
    assert rel_error(out, reference_delta(inputs)) < 1e-5


def test_split_k_is_used_and_reproducible():
    # The interpreter runs programs one after another, so equal results here say only that the split-K
    # reduction is deterministic in value; the bitwise check under real concurrency is in tests/ops/test_gpu.py.
    case = CASES[-1]
    inputs = make_inputs(case)
    L, R, K = inputs["lora_a"].shape
    assert shrink_config(4, K, R, torch.float32)["SPLIT_K"] > 1, "the long-K case must exercise split-K"
    first = dlp.fused_lora(**inputs, backend="triton")
    again = dlp.fused_lora(**inputs, backend="triton")
    assert torch.equal(first, again)


def test_rank_zero_and_empty_batches():
    case = Case("r0", [2, 3], P=2, L=3, K=16, N=8, R=4, ranks=[0, 0, 0], empty_slot_frac=0.0)
    for backend in ("torch", "triton"):
        assert dlp.fused_lora(**make_inputs(case), backend=backend).abs().max() == 0
    empty = make_inputs(Case("T0", [0, 0], P=2, L=3, K=16, N=8, R=4))
    for backend in ("torch", "triton"):
        assert dlp.fused_lora(**empty, backend=backend).shape == (0, 8)
    no_slots = make_inputs(Case("P0", [2, 1], P=0, L=3, K=16, N=8, R=4))
    assert dlp.fused_lora(**no_slots, backend="triton").abs().max() == 0


def test_negative_weights_subtract_and_repeats_add_twice():
    inputs = make_inputs(Case("signs", [4], P=2, L=2, K=16, N=8, R=4, empty_slot_frac=0.0))
    inputs["adapter_ids"] = torch.tensor([[1, 1]])
    inputs["adapter_weights"] = torch.tensor([[0.5, 0.5]])
    once = dict(inputs, adapter_ids=torch.tensor([[1]]), adapter_weights=torch.tensor([[1.0]]))
    negated = dict(once, adapter_weights=torch.tensor([[-1.0]]))
    for backend in ("torch", "triton"):
        y_twice = dlp.fused_lora(**inputs, backend=backend)
        y_once = dlp.fused_lora(**once, backend=backend)
        assert torch.allclose(y_twice, y_once, atol=1e-6)
        assert torch.allclose(dlp.fused_lora(**negated, backend=backend), -y_once, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_planned_form_equals_simple_call(backend):
    inputs = make_inputs(CASES[1])
    L = inputs["lora_a"].shape[0]
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], L)
    y = dlp.fused_lora_planned(
        inputs["x"],
        inputs["lora_a"],
        inputs["lora_b"],
        plan,
        ranks=inputs["ranks"],
        scales=inputs["scales"],
        backend=backend,
    )
    assert torch.equal(y, dlp.fused_lora(**inputs, backend=backend))
    # The same plan serves another layer (other N, ranks and scales) of the same forward pass.
    b2 = torch.randn(L, 11, inputs["lora_b"].shape[2])
    y2 = dlp.fused_lora_planned(inputs["x"], inputs["lora_a"], b2, plan, backend=backend)
    ref2 = reference_delta(dict(inputs, lora_b=b2, ranks=None, scales=None))
    assert rel_error(y2, ref2) < 1e-5


def test_reference_equals_naive_per_token_loop():
    inputs = make_inputs(CASES[3], torch.float64)
    x, a, b = inputs["x"], inputs["lora_a"], inputs["lora_b"]
    offsets, ids, weights, scales = (
        inputs["seq_offsets"],
        inputs["adapter_ids"],
        inputs["adapter_weights"],
        inputs["scales"],
    )
    expected = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = int(torch.searchsorted(offsets, t, right=True)) - 1
        for p in range(ids.shape[1]):
            i = int(ids[s, p])
            if i >= 0:
                for n in range(b.shape[1]):
                    shrunk = [
                        float(weights[s, p]) * float(scales[i]) * float((x[t] * a[i, j]).sum())
                        for j in range(a.shape[1])
                    ]
                    expected[t, n] += sum(shrunk[j] * float(b[i, n, j]) for j in range(a.shape[1]))
    assert torch.allclose(
        dlp.fused_lora_reference(x, a, b, offsets, ids, weights, None, scales),
        expected,
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repeated_id_with_gap_is_not_taken_for_a_contiguous_run(backend):
    """Regression (found by hypothesis): adapter 0 has 6 rows spanning tokens 0..5, but tokens 0 and 1
    hold two rows each and tokens 2, 3 none, so the rows are not the slice 0:6."""
    inputs = make_inputs(Case("gap", [2, 2, 2], P=2, L=2, K=12, N=5, R=3))
    inputs["adapter_ids"] = torch.tensor([[0, 0], [-1, -1], [0, -1]])
    assert rel_error(dlp.fused_lora(**inputs, backend=backend), reference_delta(inputs)) < 1e-5


def _poison_beyond_rank(inputs):
    """NaN in every A row / B column beyond an adapter's rank: the contract says it is ignored."""
    for i, r in enumerate(inputs["ranks"].tolist()):
        inputs["lora_a"][i, r:] = float("nan")
        inputs["lora_b"][i, :, r:] = float("nan")
    return inputs


PADDED = Case("padded_9x4_P3", [9, 9, 9, 9], P=3, L=5, K=37, N=29, R=16, ranks=[16, 1, 0, 9, 4])


@pytest.mark.parametrize("method", ["grouped", "seq_bmm", "dense"])
def test_torch_path_methods_match_reference(method):
    from dlplora_triton.backends.torch_path import fused_lora_torch
    from dlplora_triton.plan import build_plan

    inputs = make_inputs(PADDED)
    ref = reference_delta(inputs)
    inputs = _poison_beyond_rank(inputs)
    plan = build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], PADDED.L)
    out = torch.zeros_like(ref, dtype=torch.float32)
    fused_lora_torch(
        inputs["x"],
        inputs["lora_a"],
        inputs["lora_b"],
        plan,
        out,
        inputs["ranks"],
        inputs["scales"],
        method=method,
    )
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whatever_lies_beyond_a_rank_is_ignored(backend):
    inputs = make_inputs(CASES[1])
    ref = reference_delta(inputs)
    assert rel_error(dlp.fused_lora(**_poison_beyond_rank(inputs), backend=backend), ref) < 1e-5


def test_seq_bmm_refuses_ragged_batches():
    from dlplora_triton.backends.torch_path import fused_lora_torch
    from dlplora_triton.plan import build_plan

    inputs = make_inputs(CASES[1])
    plan = build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], CASES[1].L)
    with pytest.raises(ValueError, match="one common, non-zero length"):
        fused_lora_torch(
            inputs["x"], inputs["lora_a"], inputs["lora_b"], plan, torch.zeros(63, 70), method="seq_bmm"
        )


@pytest.mark.parametrize("method", ["grouped", "dense", "seq_bmm"])
@pytest.mark.parametrize("case", CASES + [PADDED], ids=str)
def test_every_torch_method_on_every_case(case, method):
    """auto picks one method per batch shape; each must be right on any batch it accepts."""
    from dlplora_triton.backends.torch_path import TorchPathCache, fused_lora_torch
    from dlplora_triton.plan import build_plan

    inputs = make_inputs(case)
    plan = build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], case.L)
    if method == "seq_bmm" and TorchPathCache(plan).uniform_seq_len() == 0:
        pytest.skip("seq_bmm serves padded batches only")
    ref = reference_delta(inputs)
    out = torch.zeros(ref.shape)
    fused_lora_torch(
        inputs["x"],
        inputs["lora_a"],
        inputs["lora_b"],
        plan,
        out,
        inputs["ranks"],
        inputs["scales"],
        method=method,
    )
    assert rel_error(out, ref) < 1e-5 if ref.abs().sum() else out.abs().sum() == 0


def test_gap_regression_on_the_grouped_method():
    from dlplora_triton.backends.torch_path import fused_lora_torch
    from dlplora_triton.plan import build_plan

    inputs = make_inputs(Case("gap", [2, 2, 2], P=2, L=2, K=12, N=5, R=3))
    inputs["adapter_ids"] = torch.tensor([[0, 0], [-1, -1], [0, -1]])
    plan = build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], 2)
    out = torch.zeros(6, 5)
    fused_lora_torch(
        inputs["x"], inputs["lora_a"], inputs["lora_b"], plan, out, scales=inputs["scales"], method="grouped"
    )
    assert rel_error(out, reference_delta(inputs)) < 1e-5


@pytest.mark.parametrize(
    ("seqs", "P", "D", "K", "N", "method"),
    [
        (32, 3, 64, 576, 576, "dense"),  # was grouped: 3-4x slower (bench/bench_many_adapters.py)
        (32, 3, 64, 576, 1536, "dense"),
        (64, 3, 32, 576, 576, "dense"),
        (64, 1, 64, 2048, 2048, "grouped"),  # T * R * (K + N) past DENSE_OVER_GROUPED_MAX_ADAPTER_MACS
        (128, 3, 16, 576, 576, "grouped"),  # the same limit at a narrow layer
        (96, 3, 64, 576, 576, "grouped"),  # T * (used ranks) past DENSE_OVER_GROUPED_MAX_TOKEN_RANKS
    ],
)
def test_auto_method_for_decode_over_many_adapters(seqs, P, D, K, N, method):
    """Decode over more (sequence, slot) pairs than seq_bmm takes: dense while its work per adapter is
    small (docs/pytorch-path.md), grouped beyond; every used adapter's weights are read once either way."""
    from dlplora_triton.backends.torch_path import TorchPathCache, pick_method
    from dlplora_triton.plan import build_plan

    ids = (torch.arange(seqs)[:, None] * P + torch.arange(P)[None, :]) % D
    plan = build_plan(torch.arange(seqs + 1), ids, torch.full((seqs, P), 1.0 / P), 64)
    lora_a, lora_b = torch.empty(64, 16, K), torch.empty(64, N, 16)  # only the shapes are read
    assert pick_method(plan, lora_a, lora_b) == method
    assert pick_method(plan, lora_a, lora_b, cache=TorchPathCache(plan, sparse=True)) == "grouped"
