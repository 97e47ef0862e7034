"""One shrink for the projections that read the same input (q/k/v, gate/up): exact vs PEFT, one matmul."""

import copy

import peft_helpers
import pytest
import torch
from lora_cases import rel_error

import dlplora_triton as dlp
from dlplora_triton import batch as batch_module
from dlplora_triton.backends import torch_path

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = peft_helpers.make_model("llama")
    tmp = tmp_path_factory.mktemp("shared")
    paths = {
        "a": peft_helpers.save_adapter(base, tmp / "a", 1, scale=0.2, r=4, lora_alpha=8, target_modules=ALL),
        # Other ranks per module, and k_proj / up_proj not adapted by b: groups mix ranks and zeros.
        "b": peft_helpers.save_adapter(
            base,
            tmp / "b",
            2,
            scale=0.2,
            r=8,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            rank_pattern={"v_proj": 2},
        ),
    }
    return base, paths, peft_helpers.PeftOracle(base, paths)


@pytest.mark.parametrize("seq,method", [(6, "seq_bmm"), (1, "dense")], ids=["seq_bmm", "dense"])
def test_one_shrink_per_group_and_rows_equal_peft(setup, seq, method, monkeypatch):
    base, paths, oracle = setup
    if method == "seq_bmm":  # these tiny batches would all go dense
        monkeypatch.setattr(torch_path, "DENSE_MAX_TOKEN_RANKS", 16)
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    groups = {id(layer.shrink_group) for layer in lora.layers.values() if layer.shrink_group is not None}
    assert len(groups) == 4  # q/k/v and gate/up in each of the 2 decoder layers
    real = batch_module.shrink_shared
    kinds = []

    def counting(*args):
        result = real(*args)
        kinds.append(result[0])
        return result

    monkeypatch.setattr(batch_module, "shrink_shared", counting)
    selection = [[("a", 0.7), ("b", 0.3)], [("b", 1.0)], [], [("a", -0.5)]]
    ids = torch.randint(3, peft_helpers.VOCAB, (4, seq), generator=torch.Generator().manual_seed(seq))
    lora.select(selection)
    ours = peft_helpers.run(model, ids)
    assert kinds == [method] * 4, "one shrink per group and forward, not one per projection"
    for b, row in enumerate(selection):
        assert rel_error(ours[b : b + 1], oracle.logits(row, ids[b : b + 1])) < 1e-4, f"row {b} {row}"
    # The same batch with every layer alone gives the same logits.
    for layer in lora.layers.values():
        layer.shrink_group = None
    assert rel_error(peft_helpers.run(model, ids), ours) < 1e-6
    lora.detach()


def test_a_member_called_on_another_input_runs_alone(setup):
    base, paths, _ = setup
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    lora.select([[("a", 1.0)], [("b", 0.5), ("a", 0.5)]])
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    other = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q = attn.q_proj(x)
        k_other = attn.k_proj(other)  # not the input the pending shrink was computed for
        groups = [(layer, layer.shrink_group) for layer in lora.layers.values()]
        for layer, _ in groups:
            layer.shrink_group = None
        assert torch.allclose(q, attn.q_proj(x), atol=1e-6)
        assert torch.allclose(k_other, attn.k_proj(other), atol=1e-6)
    lora.detach()
