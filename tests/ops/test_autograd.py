"""Gradients through fused_lora and the planned call: right on both backends, or refused by name."""

import copy

import peft_helpers
import pytest
import torch
from lora_cases import Case, make_inputs, rel_error

import dlplora_triton as dlp
from dlplora_triton.plan import plan_to_args

# Empty sequences, empty slots, an id repeated in a row, ranks short of R and rank 0.
CASE = Case("grad", [2, 0, 3, 1], P=3, L=4, K=7, N=5, R=4, ranks=[4, 1, 0, 3], repeat_in_row=True)


def _leaves(inputs, dtype):
    x, a, b = (inputs[k].to(dtype).clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    w = inputs["adapter_weights"].to(dtype).clone().requires_grad_()
    s = inputs["scales"].to(dtype).clone().requires_grad_()
    return x, a, b, w, s


def test_gradcheck_float64_torch_path():
    inputs = make_inputs(CASE, torch.float64, seed=3)
    offsets, ids, ranks = inputs["seq_offsets"], inputs["adapter_ids"], inputs["ranks"]

    def call(x, a, b, w, s):
        return dlp.fused_lora(x, a, b, offsets, ids, w, ranks, s, backend="torch")

    assert torch.autograd.gradcheck(call, _leaves(inputs, torch.float64))


def test_gradcheck_float64_of_the_custom_op_backward():
    """The op's own backward formulas (what torch.compile and the Triton backend use)."""
    inputs = make_inputs(CASE, torch.float64, seed=4)
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], CASE.L)
    tensors, sizes = plan_to_args(plan)

    def call(x, a, b, w, s):
        return torch.ops.dlplora_triton.fused_lora_planned_delta(
            x, a, b, tensors, sizes, inputs["ranks"], s, w, "torch"
        )

    assert torch.autograd.gradcheck(call, _leaves(inputs, torch.float64))


def _grads(inputs, backend, dtype=torch.float32):
    leaves = _leaves(inputs, dtype)
    x, a, b, w, s = leaves
    y = dlp.fused_lora(
        x, a, b, inputs["seq_offsets"], inputs["adapter_ids"], w, inputs["ranks"], s, backend=backend
    )
    assert y.requires_grad
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    (y * probe).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "case",
    [
        CASE,
        Case("prefill", [5, 9, 0, 4], P=2, L=5, K=33, N=20, R=8, ranks=[8, 2, 5, 0, 7]),
        Case("long_K", [1, 2], P=2, L=3, K=1100, N=12, R=4),
    ],
    ids=str,
)
def test_triton_backward_equals_torch_backward(case):
    inputs = make_inputs(case, seed=5)
    for name, want, got in zip(
        ("x", "lora_a", "lora_b", "weights", "scales"), _grads(inputs, "torch"), _grads(inputs, "triton")
    ):
        assert rel_error(got, want) < 1e-5, name


def test_out_keeps_the_graph_of_the_base_output():
    inputs = make_inputs(CASE, seed=6)
    x, a, b, w, s = _leaves(inputs, torch.float32)
    weight = torch.randn(CASE.N, CASE.K, requires_grad=True)
    y = dlp.fused_lora(
        x, a, b, inputs["seq_offsets"], inputs["adapter_ids"], w, inputs["ranks"], s, out=x @ weight.t()
    )
    y.sum().backward()
    assert weight.grad is not None and x.grad is not None


def test_a_plan_whose_weights_carry_grad_is_refused_where_its_gradient_is_not_computed():
    inputs = make_inputs(CASE, seed=7)
    w = inputs["adapter_weights"].clone().requires_grad_()
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], w, CASE.L)
    tensors, sizes = plan_to_args(plan)
    with pytest.raises(ValueError, match="adapter_weights="):
        torch.ops.dlplora_triton.fused_lora_planned_delta(
            inputs["x"].requires_grad_(),
            inputs["lora_a"],
            inputs["lora_b"],
            tensors,
            sizes,
            None,
            None,
            None,
            "torch",
        )


def test_per_call_weights_replace_the_plan_weights():
    inputs = make_inputs(CASE, seed=8)
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], CASE.L)
    other = torch.randn(inputs["adapter_weights"].shape, generator=torch.Generator().manual_seed(1))
    args = (inputs["x"], inputs["lora_a"], inputs["lora_b"])
    for backend in ("torch", "triton") if dlp.checks._interpreting() else ("torch",):
        got = dlp.fused_lora_planned(
            *args, plan, inputs["ranks"], inputs["scales"], backend=backend, adapter_weights=other
        )
        want = dlp.fused_lora(**dict(inputs, adapter_weights=other), backend="torch")
        assert rel_error(got, want) < 1e-5, backend
    with pytest.raises(ValueError, match=r"adapter_weights must be \[S, P\]"):
        dlp.fused_lora_planned(*args, plan, adapter_weights=other[:, :1])


def test_attached_model_input_gradients_equal_peft(tmp_path):
    base = peft_helpers.make_model("llama")
    paths = {
        "a": peft_helpers.save_adapter(
            base,
            tmp_path / "a",
            1,
            scale=0.2,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
        ),
        "b": peft_helpers.save_adapter(
            base,
            tmp_path / "b",
            2,
            scale=0.2,
            r=8,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
        ),
    }
    oracle = peft_helpers.PeftOracle(base, paths)
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    selection = [[("a", 0.6), ("b", 0.4)], [("b", 1.0)], []]
    lora.select(selection)
    embeds = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probe = torch.randn(3, 5, peft_helpers.VOCAB, generator=torch.Generator().manual_seed(3))
    (model(inputs_embeds=embeds).logits * probe).sum().backward()
    for row, mix in enumerate(selection):
        mine = embeds[row : row + 1].detach().clone().requires_grad_()
        with oracle.active(mix):
            (oracle.model(inputs_embeds=mine).logits * probe[row : row + 1]).sum().backward()
        assert rel_error(embeds.grad[row : row + 1], mine.grad) < 1e-5, f"row {row} {mix}"
    lora.detach()
