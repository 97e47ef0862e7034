"""MultiLoRA.set_module_gates (MiLoRA's per-module, per-row gate on one adapter) against PEFT."""

import copy

import peft_helpers
import pytest
import torch
from lora_cases import rel_error

import dlplora_triton as dlp

GATED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
SELECTION = [[("a", 0.7)], [("a", 1.0)], [("b", 1.0)], []]
GATES = torch.tensor([0.5, -1.5, 3.0, 2.0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = peft_helpers.make_model("llama")
    tmp = tmp_path_factory.mktemp("gates")
    paths = {
        "a": peft_helpers.save_adapter(
            base, tmp / "a", 1, scale=0.3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "b": peft_helpers.save_adapter(
            base, tmp / "b", 2, scale=0.3, r=8, lora_alpha=6, target_modules=["q_proj", "o_proj", "down_proj"]
        ),
    }
    return base, paths, peft_helpers.PeftOracle(base, paths)


def _peft_row(oracle, row, gate, ids, **kwargs):
    """PEFT on one single-adapter row, adapter ``a``'s scaling times ``gate`` in the gated modules."""
    with oracle.active(row):
        name = row[0][0] if row else None
        modules = [
            m
            for path, m in oracle.model.named_modules()
            if name == "a" and path.endswith(GATED) and isinstance(getattr(m, "scaling", None), dict)
        ]
        saved = [m.scaling[name] for m in modules]
        for m in modules:
            m.scaling[name] *= gate
        try:
            return peft_helpers.run(oracle.model, ids, **kwargs)
        finally:
            for m, s in zip(modules, saved):
                m.scaling[name] = s


def test_gated_rows_match_peft_through_prefill_and_decode(setup):
    base, paths, oracle = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    lora.select(SELECTION)
    ungated = peft_helpers.run(
        model, ids := torch.randint(3, peft_helpers.VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    )
    lora.set_module_gates("a", {path: GATES for path in GATED})
    ours = peft_helpers.run(model, ids)
    for b, row in enumerate(SELECTION):
        want = _peft_row(oracle, row, float(GATES[b]), ids[b : b + 1])
        assert rel_error(ours[b : b + 1], want) < 1e-4, f"row {b} {row}"
    assert rel_error(ours[:2], ungated[:2]) > 1e-3, "the gates must change the rows that use adapter a"
    assert torch.equal(ours[2:], ungated[2:]), "rows without adapter a are untouched"
    # Decode with the KV cache: the same gates at every step (greedy tokens equal PEFT's per row).
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    for b, row in enumerate(SELECTION):
        step_ids = ids[b : b + 1]
        for _ in range(4):  # PEFT, one greedy step at a time, gates on
            step_ids = torch.cat(
                [step_ids, _peft_row(oracle, row, float(GATES[b]), step_ids)[:, -1:].argmax(-1)], 1
            )
        assert torch.equal(tokens[b : b + 1], step_ids), f"row {b}"
    # A new selection drops the gates; None clears them explicitly.
    lora.select(SELECTION)
    assert torch.equal(peft_helpers.run(model, ids), ungated)
    lora.set_module_gates("a", {GATED[0]: GATES})
    lora.set_module_gates("a", None)
    assert torch.equal(peft_helpers.run(model, ids), ungated)
    lora.detach()


def test_gates_train_through_the_layers(setup):
    base, paths, _ = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    lora.select(SELECTION)
    gates = torch.ones(4, requires_grad=True)
    lora.set_module_gates("a", {GATED[0]: gates})
    ids = torch.randint(3, peft_helpers.VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    model(ids).logits.square().sum().backward()
    assert gates.grad is not None
    assert (gates.grad[:2] != 0).all() and (gates.grad[2:] == 0).all(), gates.grad  # only rows using a
    lora.detach()


def test_bad_gates_raise(setup):
    base, paths, _ = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    with pytest.raises(ValueError, match="needs a selection"):
        lora.set_module_gates("a", {GATED[0]: GATES})
    lora.select(SELECTION)
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        lora.set_module_gates("zz", {GATED[0]: GATES})
    with pytest.raises(ValueError, match="'model.embed_tokens': not an adapted module"):
        lora.set_module_gates("a", {"model.embed_tokens": GATES})
    with pytest.raises(ValueError, match=r"must be \[B\] = \[4\]"):
        lora.set_module_gates("a", {GATED[0]: GATES[:3]})
    with pytest.raises(ValueError, match=f"gates for '{GATED[0]}' must be finite"):
        lora.set_module_gates("a", {GATED[0]: torch.tensor([1.0, float("nan"), 1.0, 1.0])})
    lora.detach()


def _outputs(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_calls_merge_per_path(setup):
    """A call sets the given paths only; earlier gates elsewhere stay; None clears; a failed call changes
    nothing (not even the valid entries it carries)."""
    base, paths, _ = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    lora.select(SELECTION)
    ids = torch.randint(3, peft_helpers.VOCAB, (4, 5), generator=torch.Generator().manual_seed(3))
    ungated = _outputs(model, ids)
    other = torch.tensor([2.0, 0.25, 1.0, -1.0])
    lora.set_module_gates("a", {GATED[0]: GATES})
    only_first = _outputs(model, ids)
    lora.set_module_gates("a", None)
    assert torch.equal(_outputs(model, ids), ungated)
    lora.set_module_gates("a", {GATED[0]: GATES, GATED[1]: other})
    both = _outputs(model, ids)
    assert rel_error(only_first, both) > 1e-4, "the second path's gates must matter"
    # A call with only the first path again: the second keeps its gates.
    lora.set_module_gates("a", {GATED[0]: GATES})
    assert torch.equal(_outputs(model, ids), both)

    # Path by path, in two calls: the same as one call with both.
    lora.set_module_gates("a", None)
    lora.set_module_gates("a", {GATED[0]: GATES})
    assert torch.equal(_outputs(model, ids), only_first)
    lora.set_module_gates("a", {GATED[1]: other})
    assert torch.equal(_outputs(model, ids), both), "the second call kept the first call's gates"
    # Overwriting one path leaves the other.
    lora.set_module_gates("a", {GATED[1]: torch.ones(4)})
    assert torch.allclose(_outputs(model, ids), only_first, rtol=1e-6, atol=1e-6)
    lora.set_module_gates("a", {GATED[1]: other})

    # A failed call changes nothing: its valid entries are not applied either.
    nan = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    bad_calls = [
        ({GATED[0]: torch.zeros(4), GATED[1]: nan}, ValueError, "finite"),
        ({GATED[0]: torch.zeros(4), "model.embed_tokens": GATES}, ValueError, "not an adapted module"),
        ({GATED[0]: torch.zeros(4), GATED[1]: GATES[:3]}, ValueError, r"\[B\] = \[4\]"),
        ({GATED[0]: torch.zeros(4), GATED[1]: torch.ones(4, dtype=torch.int64)}, TypeError, "float tensor"),
    ]
    for gates, error, match in bad_calls:
        with pytest.raises(error, match=match):
            lora.set_module_gates("a", gates)
        assert torch.equal(_outputs(model, ids), both), gates

    # None clears every gate of the adapter: the layers take the plan's weights again.
    lora.set_module_gates("a", None)
    assert all(layer.row_weights is None for layer in lora.layers.values())
    assert torch.equal(_outputs(model, ids), ungated)
    # A new selection drops gates set path by path too.
    lora.set_module_gates("a", {GATED[0]: GATES})
    lora.set_module_gates("a", {GATED[1]: other})
    lora.select(SELECTION)
    assert all(layer.row_weights is None for layer in lora.layers.values())
    assert torch.equal(_outputs(model, ids), ungated)
    lora.detach()


def test_gates_of_two_adapters_on_one_path_multiply_per_row(setup):
    """Gates of ``a`` and ``b`` at the same module scale each adapter's slot; clearing one keeps the other."""
    base, paths, _ = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    mixed = [[("a", 0.7), ("b", 0.4)], [("b", 1.0)], [("a", 1.0)], []]
    lora.select(mixed)
    path = "model.layers.0.self_attn.q_proj"  # adapted by both
    ga, gb = torch.tensor([0.5, 2.0, -1.0, 3.0]), torch.tensor([1.5, 0.25, 4.0, 2.0])
    lora.set_module_gates("a", {path: ga})
    lora.set_module_gates("b", {path: gb})
    weights = lora.layers[path].row_weights
    want = torch.tensor([[0.7 * 0.5, 0.4 * 1.5], [0.25, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(weights, want), weights
    lora.set_module_gates("a", None)
    want = torch.tensor([[0.7, 0.4 * 1.5], [0.25, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(lora.layers[path].row_weights, want)
    lora.set_module_gates("b", None)
    assert lora.layers[path].row_weights is None
    lora.detach()
