"""Every bad input of the fused_lora contract raises the documented exception, naming the problem."""

import pytest
import torch
from lora_cases import Case, make_inputs

import dlplora_triton as dlp

pytestmark = pytest.mark.interpreter

CASE = Case("small", [2, 3], P=2, L=3, K=16, N=8, R=4)


def _with(**changes):
    inputs = make_inputs(CASE)
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    ("x_not_tensor", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("x_1d", dict(x=torch.randn(5)), ValueError, r"x must be \[T, K\]"),
    ("x_int", dict(x=torch.ones(5, 16, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    ("a_wrong_K", dict(lora_a=torch.randn(3, 4, 17)), ValueError, "lora_a is"),
    ("b_wrong_L", dict(lora_b=torch.randn(2, 8, 4)), ValueError, "lora_b is"),
    ("b_wrong_R", dict(lora_b=torch.randn(3, 8, 5)), ValueError, "lora_b is"),
    ("dtype_mismatch", dict(lora_a=torch.randn(3, 4, 16, dtype=torch.float64)), TypeError, "share a dtype"),
    ("dtype_mismatch_is_value_error", dict(lora_b=torch.randn(3, 8, 4).half()), ValueError, "share a dtype"),
    (
        "ids_out_of_range",
        dict(adapter_ids=torch.tensor([[0, 3], [1, -1]])),
        ValueError,
        "adapter_ids must lie in -1..2",
    ),
    ("ids_below_minus_one", dict(adapter_ids=torch.tensor([[0, -2], [1, -1]])), ValueError, "got -2"),
    ("ids_float", dict(adapter_ids=torch.zeros(2, 2)), TypeError, "adapter_ids must be int32 or int64"),
    (
        "ids_1d",
        dict(adapter_ids=torch.zeros(2, dtype=torch.int64)),
        ValueError,
        r"adapter_ids must be \[S, P\]",
    ),
    (
        "weights_nan",
        dict(adapter_weights=torch.tensor([[1.0, float("nan")], [0.5, 0.5]])),
        ValueError,
        "finite",
    ),
    (
        "weights_inf",
        dict(adapter_weights=torch.tensor([[1.0, float("inf")], [0.5, 0.5]])),
        ValueError,
        "finite",
    ),
    ("weights_shape", dict(adapter_weights=torch.ones(2, 3)), ValueError, "adapter_weights must match"),
    ("weights_int", dict(adapter_weights=torch.ones(2, 2, dtype=torch.int64)), TypeError, "floating point"),
    ("offsets_not_monotone", dict(seq_offsets=torch.tensor([0, 6, 5])), ValueError, "non-decreasing"),
    (
        "offsets_not_ending_at_T",
        dict(seq_offsets=torch.tensor([0, 2, 4])),
        ValueError,
        r"seq_offsets\[-1\] must equal",
    ),
    (
        "offsets_not_starting_at_0",
        dict(seq_offsets=torch.tensor([1, 2, 5])),
        ValueError,
        r"seq_offsets\[0\] must be 0",
    ),
    (
        "offsets_wrong_length",
        dict(seq_offsets=torch.tensor([0, 5])),
        ValueError,
        r"seq_offsets must be \[S\+1\]",
    ),
    (
        "offsets_float",
        dict(seq_offsets=torch.tensor([0.0, 2.0, 5.0])),
        TypeError,
        "seq_offsets must be int32",
    ),
    ("rank_too_large", dict(ranks=torch.tensor([4, 5, 1])), ValueError, "ranks must lie in 0..R"),
    ("rank_negative", dict(ranks=torch.tensor([4, -1, 1])), ValueError, "ranks must lie in 0..R"),
    ("ranks_wrong_length", dict(ranks=torch.tensor([4, 4])), ValueError, r"ranks must have shape \[L\]"),
    ("ranks_float", dict(ranks=torch.tensor([4.0, 4.0, 4.0])), TypeError, "ranks must hold integers"),
    ("scales_nan", dict(scales=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "scales must be finite"),
    ("scales_wrong_length", dict(scales=torch.ones(4)), ValueError, r"scales must have shape \[L\]"),
    ("out_wrong_shape", dict(out=torch.zeros(5, 9)), ValueError, r"out must be \[T, N\]"),
    (
        "out_wrong_dtype",
        dict(out=torch.zeros(5, 8, dtype=torch.float64)),
        TypeError,
        "out must have x's dtype",
    ),
    ("bad_backend", dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("changes,exc,message", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises(changes, exc, message, backend):
    inputs = _with(**changes)
    inputs.setdefault("backend", backend)
    with pytest.raises(exc, match=message):
        dlp.fused_lora(**inputs)


def test_failed_call_leaves_out_unchanged():
    out = torch.randn(5, 8)
    before = out.clone()
    with pytest.raises(ValueError):
        dlp.fused_lora(**_with(adapter_ids=torch.tensor([[0, 7], [1, -1]])), out=out)
    assert torch.equal(out, before)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dlp.fused_lora(**_with(), backend="triton")


def test_ranks_and_scales_accept_python_lists():
    inputs = _with()
    y_lists = dlp.fused_lora(**dict(inputs, ranks=[4, 2, 0], scales=[1.0, 0.5, 2.0]))
    y_tensors = dlp.fused_lora(
        **dict(inputs, ranks=torch.tensor([4, 2, 0]), scales=torch.tensor([1.0, 0.5, 2.0]))
    )
    assert torch.equal(y_lists, y_tensors)


def test_planned_call_checks_the_plan_fits():
    inputs = _with()
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], 3)
    with pytest.raises(ValueError, match="built for T = 5"):
        dlp.fused_lora_planned(torch.randn(6, 16), inputs["lora_a"], inputs["lora_b"], plan)
    with pytest.raises(ValueError, match="built for L = 3"):
        dlp.fused_lora_planned(inputs["x"], torch.randn(4, 4, 16), torch.randn(4, 8, 4), plan)
    with pytest.raises(TypeError, match="plan must be a LoRAPlan"):
        dlp.fused_lora_planned(inputs["x"], inputs["lora_a"], inputs["lora_b"], {"plan": 1})
