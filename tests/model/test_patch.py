"""attach / select / detach on tiny transformers models, with PEFT as the oracle (tests/peft_helpers.py)."""

from __future__ import annotations

import copy

import peft_helpers
import pytest
import torch
from lora_cases import rel_error
from torch import nn

import dlplora_triton as dlp
from dlplora_triton import patch as patch_module
from dlplora_triton.layers import MultiLoRALinear

REL_TOL = 1e-4  # fp32: the fused path sums the same products in another order than PEFT
VOCAB = peft_helpers.VOCAB
make_model = peft_helpers.make_model
run = peft_helpers.run
PeftOracle = peft_helpers.PeftOracle


def save_adapter(base: nn.Module, path, seed: int, **config) -> str:
    """A PEFT adapter with random A and B of standard deviation 0.2, saved to ``path``."""
    return peft_helpers.save_adapter(base, path, seed, scale=0.2, **config)


# --------------------------------------------------------------------------------- adapter sets per arch

# Two adapters per architecture: different targets, different ranks, one with rsLoRA.
ADAPTERS = {
    "llama": (
        dict(target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(target_modules=["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]),
    ),
    "phi3": (
        dict(target_modules=["qkv_proj"]),
        dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ),
    "gpt2": (
        dict(target_modules=["c_attn"], fan_in_fan_out=True),
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "bert": (dict(target_modules=["query", "value"]), dict(target_modules=["key", "dense"])),
}
ADAPTERS["qwen2"] = ADAPTERS["mistral"] = ADAPTERS["gemma"] = ADAPTERS["llama"]
ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "bert"]


@pytest.fixture(scope="module")
def arch_setup(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            base = make_model(arch)
            tmp = tmp_path_factory.mktemp(arch)
            first, second = ADAPTERS[arch]
            paths = {
                "a": save_adapter(base, tmp / "a", 1, r=4, lora_alpha=8, **first),
                "b": save_adapter(base, tmp / "b", 2, r=8, lora_alpha=6, use_rslora=True, **second),
            }
            cache[arch] = (base, paths, PeftOracle(base, paths))
        return cache[arch]

    return get


def ids_for(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- equality


def assert_rows_match_peft(model, lora, oracle, selection, ids):
    """Select ``selection``, run the batch once, and check every row against PEFT serving that row's
    mix alone; returns our logits."""
    lora.select(selection)
    ours = run(model, ids)
    for s, row in enumerate(selection):
        assert rel_error(ours[s : s + 1], oracle.logits(row, ids[s : s + 1])) < REL_TOL, f"row {s} {row}"
    return ours


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_match_peft_weighted_cat(arch, arch_setup):
    base, paths, oracle = arch_setup(arch)
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    selection = [[("a", 0.7), ("b", 0.3)], [("b", -1.25)], [], [("a", 1.0)], [("b", 0.5), ("a", -0.8)]]
    ids = ids_for(len(selection), 7)
    ours = assert_rows_match_peft(model, lora, oracle, selection, ids)
    # The rows that use adapters really differ from the base model.
    base_out = run(base, ids)
    assert rel_error(ours[0], base_out[0]) > 1e-2
    assert torch.equal(ours[2], base_out[2]) or rel_error(ours[2], base_out[2]) < 1e-6


def test_bert_pooler_rows(arch_setup):
    """BERT's pooler dense layer sees one token per row ([B, H]): rows still get their own mix."""
    base, paths, oracle = arch_setup("bert")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    assert "pooler.dense" in lora.layers
    selection = [[("b", 1.0)], [("a", 0.5), ("b", 0.5)]]
    ids = ids_for(2, 6, seed=3)
    lora.select(selection)
    with torch.no_grad():
        pooled = model(ids).pooler_output
    for s, row in enumerate(selection):
        with oracle.active(row), torch.no_grad():
            want = oracle.model(ids[s : s + 1]).pooler_output
        assert rel_error(pooled[s : s + 1], want) < REL_TOL


def test_rank_and_alpha_patterns(tmp_path):
    base = make_model("llama")
    paths = {
        "pat": save_adapter(
            base,
            tmp_path / "pat",
            3,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 3, "layers.0.self_attn.v_proj": 5},
        ),
        "plain": save_adapter(
            base, tmp_path / "plain", 4, r=3, lora_alpha=3, target_modules=["q_proj", "up_proj"]
        ),
    }
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    info = lora.adapters["pat"]
    assert info.module_ranks["model.layers.1.self_attn.q_proj"] == 6
    assert info.module_ranks["model.layers.0.self_attn.v_proj"] == 2
    assert info.module_scales["model.layers.0.self_attn.v_proj"] == pytest.approx(5 / 2)
    assert info.module_scales["model.layers.1.mlp.down_proj"] == pytest.approx(3 / 4)
    oracle = PeftOracle(base, paths)
    selection = [[("pat", 0.6), ("plain", -0.4)], [("pat", 2.0)]]
    ids = ids_for(2, 5, seed=4)
    assert_rows_match_peft(model, lora, oracle, selection, ids)


def test_layers_to_transform_and_regex_targets(tmp_path):
    base = make_model("qwen2")
    paths = {
        "upper": save_adapter(
            base,
            tmp_path / "upper",
            5,
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
        ),
        "regex": save_adapter(
            base,
            tmp_path / "regex",
            6,
            r=2,
            lora_alpha=4,
            target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj",
        ),
    }
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    assert lora.adapters["upper"].targets == (
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    )
    assert lora.adapters["regex"].targets == (
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
    )
    assert isinstance(model.model.layers[0].self_attn.v_proj, nn.Linear)  # targeted by neither
    oracle = PeftOracle(base, paths)
    selection = [[("upper", 0.9)], [("regex", -1.5)], []]
    ids = ids_for(3, 6, seed=5)
    assert_rows_match_peft(model, lora, oracle, selection, ids)


def test_tensor_selection_equals_list_selection(arch_setup):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    ids = ids_for(3, 5, seed=6)
    lora.select([[("a", 0.25), ("b", 0.75)], [], [("b", -2.0)]])
    by_names = run(model, ids)
    a, b = lora.names.index("a"), lora.names.index("b")
    lora.select(
        (torch.tensor([[a, b], [-1, -1], [-1, b]]), torch.tensor([[0.25, 0.75], [0.0, 0.0], [9.0, -2.0]]))
    )
    assert torch.equal(run(model, ids), by_names)


# ------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def llama_generation(arch_setup):
    base, paths, oracle = arch_setup("llama")
    model = copy.deepcopy(base)
    return base, model, dlp.attach(model, paths), oracle


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for s, p in enumerate(prompts):
        ids[s, width - len(p) :] = torch.tensor(p)
        mask[s, width - len(p) :] = 1
    return ids, mask


GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_generate_matches_peft_with_left_padding(llama_generation):
    base, model, lora, oracle = llama_generation
    prompts = [[5, 17, 33, 8, 61, 20, 9], [44, 12, 90]]
    mixes = [[("a", 0.6), ("b", 0.4)], [("b", 1.0), ("a", -0.5)]]
    ids, mask = _left_padded(prompts)
    with lora.selection(mixes), torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    for s, (prompt, mix) in enumerate(zip(prompts, mixes)):
        alone_ids = torch.tensor([prompt])
        with lora.selection([mix]), torch.no_grad():
            ours_alone = model.generate(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), **GEN)
        peft_alone = oracle.generate(mix, alone_ids, attention_mask=torch.ones_like(alone_ids), **GEN)
        new = batch[s, ids.shape[1] :]
        assert ours_alone[0, len(prompt) :].tolist() == peft_alone[0, len(prompt) :].tolist(), f"row {s}"
        assert new.tolist() == peft_alone[0, len(prompt) :].tolist(), f"row {s} in the padded batch"
    # Outside the block the base model is back.
    with torch.no_grad():
        assert torch.equal(
            model.generate(input_ids=ids, attention_mask=mask, **GEN),
            base.generate(input_ids=ids, attention_mask=mask, **GEN),
        )


def test_plan_built_once_per_forward_and_per_tokens_per_row(llama_generation, monkeypatch):
    _, model, lora, _ = llama_generation
    calls = []
    real = patch_module.prepare_batch

    def counting(*args, **kwargs):
        calls.append(kwargs.get("num_tokens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_module, "prepare_batch", counting)
    ids = ids_for(2, 5, seed=7)
    lora.select([[("a", 1.0)], [("b", 0.5), ("a", 0.5)]])
    run(model, ids)
    assert calls == [10]  # once for the whole forward, not once per adapted layer (there are 16)
    run(model, ids)
    assert calls == [10]  # same selection, same shape: the plan is reused
    lora.select([[("b", 1.0)], []])
    calls.clear()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    assert calls == [10, 2]  # prefill (5 tokens per row) + one plan for every decode step (1 per row)


# ------------------------------------------------------------------------------------- detach / errors


def _tree(model: nn.Module) -> list[tuple[str, int]]:
    return [(name, id(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detach_restores_identical_modules_and_outputs(arch, arch_setup):
    base, paths, _ = arch_setup(arch)
    model = copy.deepcopy(base)
    ids = ids_for(2, 6, seed=8)
    before_out, before_tree = run(model, ids), _tree(model)
    before_keys = list(model.state_dict())
    lora = dlp.attach(model, paths)
    assert all(isinstance(m, MultiLoRALinear) for m in lora.layers.values())
    assert torch.equal(run(model, ids), before_out)  # attached, nothing selected: base model
    lora.select([[("a", 1.0)], [("b", 1.0)]])
    assert not torch.equal(run(model, ids), before_out)
    lora.detach()
    assert _tree(model) == before_tree
    assert list(model.state_dict()) == before_keys
    assert not model._forward_pre_hooks
    assert torch.equal(run(model, ids), before_out)
    assert "detached" in repr(lora)
    with pytest.raises(RuntimeError, match="detached"):
        lora.select([[("a", 1.0)], []])
    dlp.attach(model, paths).detach()  # can attach again after detach


def _snapshot(model):
    return _tree(model), {k: v.clone() for k, v in model.state_dict().items()}, len(model._forward_pre_hooks)


def _assert_same(model, snapshot):
    tree, state, hooks = snapshot
    assert _tree(model) == tree
    assert len(model._forward_pre_hooks) == hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_failed_attach_changes_nothing(arch_setup, tmp_path):
    base, paths, _ = arch_setup("llama")
    other = make_model("llama")
    other.model.layers[1].self_attn.q_proj = nn.Linear(32, 48, bias=False)  # a model of another shape
    wrong_shape = save_adapter(other, tmp_path / "wrong", 9, r=4, target_modules=["q_proj"])
    dora = save_adapter(base, tmp_path / "dora", 10, r=4, target_modules=["q_proj"], use_dora=True)
    to_save = save_adapter(
        base, tmp_path / "mts", 11, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    model = copy.deepcopy(base)
    snapshot = _snapshot(model)
    cases = [
        (
            {"a": paths["a"], "wrong": wrong_shape},
            ValueError,
            r"'wrong'.*model\.layers\.1\.self_attn\.q_proj.*does not fit",
        ),
        ({"a": paths["a"], "dora": dora}, ValueError, r"'dora'.*DoRA"),
        ({"mts": to_save}, ValueError, r"'mts'.*modules_to_save"),
        ({"a": paths["a"], "gone": str(tmp_path / "missing")}, FileNotFoundError, r"'gone'"),
    ]
    for adapters, error, match in cases:
        with pytest.raises(error, match=match):
            dlp.attach(model, adapters)
        _assert_same(model, snapshot)


def test_attach_twice_is_refused(arch_setup):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    with pytest.raises(ValueError, match="already has MultiLoRA layers"):
        dlp.attach(model, paths)
    lora.detach()


def test_bad_selections_raise_and_keep_the_previous_one(arch_setup):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    ids = ids_for(2, 4, seed=9)
    lora.select([[("a", 0.5)], [("b", 1.0)]])
    expected = run(model, ids)
    bad = [
        ([[("c", 1.0)], []], KeyError, "unknown adapter 'c'"),
        ([[("a", 0.5), ("a", 0.5)], []], ValueError, "more than once"),
        ([[("a", float("nan"))], []], ValueError, "finite"),
        ([[("a", float("inf"))], []], ValueError, "finite"),
        ([[("a", "heavy")], []], TypeError, "real number"),
        ([["a"], []], TypeError, r"\(name, weight\)"),
        ("a", TypeError, "selection"),
        ((torch.tensor([[0, 0]]), torch.tensor([[1.0, 1.0]])), ValueError, "more than once"),
        ((torch.tensor([[2]]), torch.tensor([[1.0]])), ValueError, "adapter_ids"),
        ((torch.tensor([[0]]), torch.tensor([[float("nan")]])), ValueError, "finite"),
    ]
    for selection, error, match in bad:
        with pytest.raises(error, match=match):
            lora.select(selection)
        assert torch.equal(run(model, ids), expected), selection
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        run(model, ids_for(3, 4))
    with pytest.raises(ValueError, match="2 rows but the batch has 1"):
        run(model, ids[:1])
    lora.select([[], []])  # all rows base: still checked against the batch
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        run(model, ids_for(3, 4))
    lora.select(None)  # no selection: the base model for any batch
    assert torch.equal(run(model, ids_for(3, 4)), run(base, ids_for(3, 4)))


def test_selection_context_restores_previous_even_on_error(arch_setup):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    ids = ids_for(1, 5, seed=10)
    lora.select([[("a", 1.0)]])
    outer = run(model, ids)
    with lora.selection([[("b", 1.0)]]):
        inner = run(model, ids)
        with lora.selection([[]]):
            assert torch.equal(run(model, ids), run(base, ids))
        assert torch.equal(run(model, ids), inner)
    assert torch.equal(run(model, ids), outer)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.selection([[("b", 1.0)]]):
            raise RuntimeError("boom")
    assert torch.equal(run(model, ids), outer)
    with pytest.raises(KeyError):
        with lora.selection([[("zzz", 1.0)]]):
            pass
    assert torch.equal(run(model, ids), outer)


def test_add_and_remove(arch_setup, tmp_path):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, {"a": paths["a"]})
    assert lora.names == ("a",)
    ids = ids_for(2, 5, seed=11)
    lora.select([[("a", 1.0)], []])
    only_a = run(model, ids)
    snapshot = _snapshot(model)
    dora = save_adapter(base, tmp_path / "dora", 12, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora.add("dora", dora)
    with pytest.raises(ValueError, match="already attached"):
        lora.add("a", paths["a"])
    _assert_same(model, snapshot)
    assert lora.names == ("a",)
    assert torch.equal(run(model, ids), only_a)

    lora.add("b", paths["b"])  # wraps the modules only b adapts, grows the stacks of the others
    assert lora.names == ("a", "b")
    # The current selection survives. Not bitwise: b widens the stacks (R 4 -> 8), which changes the
    # bmm reduction length of the padded-batch path, and so its rounding.
    assert rel_error(run(model, ids), only_a) < 1e-6
    lora.select([[("a", 0.3), ("b", 0.7)], [("b", 1.0)]])
    mixed = run(model, ids)
    fresh = copy.deepcopy(base)
    fresh_lora = dlp.attach(fresh, paths)
    fresh_lora.select([[("a", 0.3), ("b", 0.7)], [("b", 1.0)]])
    assert rel_error(mixed, run(fresh, ids)) < 1e-6

    with pytest.raises(ValueError, match="used by the current selection"):
        lora.remove("a")
    with pytest.raises(KeyError):
        lora.remove("zzz")
    lora.select([[("b", 0.5)], []])
    with lora.selection([[("b", 1.0)], []]):
        lora.remove("a")  # unused here, and by the selection this block restores
    assert lora.names == ("b",)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # only a adapted q_proj
    assert isinstance(model.model.layers[0].self_attn.k_proj, MultiLoRALinear)
    fresh_lora.select([[("b", 0.5)], []])
    assert rel_error(run(model, ids), run(fresh, ids)) < 1e-6
    lora.detach()
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    assert torch.equal(run(model, ids), run(base, ids))


def test_names_adapters_and_repr(arch_setup):
    base, paths, _ = arch_setup("gpt2")
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    assert lora.names == ("a", "b")
    info = lora.adapters["b"]
    assert (info.rank, info.alpha, info.use_rslora, info.fan_in_fan_out) == (8, 6.0, True, True)
    assert "transformer.h.0.attn.c_attn" in info.targets and len(info.targets) == 8
    assert lora.adapters["a"].targets == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
    lora.select([[("a", 1.0)]])
    text = repr(lora)
    assert (
        "'a'" in text
        and "'b'" in text
        and "rslora" in text
        and "1 rows" in text
        and "GPT2LMHeadModel" in text
    )


# ------------------------------------------------------------------------------ packed variable length


class TokenMLP(nn.Module):
    """A per-token model (no mixing across tokens), so packed input can be checked against per-row runs."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_packed_variable_length_selection(tmp_path):
    torch.manual_seed(0)
    base = TokenMLP().eval()
    paths = {
        "u": save_adapter(base, tmp_path / "u", 13, r=3, lora_alpha=6, target_modules=["up"]),
        "d": save_adapter(
            base, tmp_path / "d", 14, r=5, lora_alpha=5, target_modules=["up", "down"], use_rslora=True
        ),
    }
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    lengths = [3, 0, 5, 1]
    rows = [[("u", 0.4), ("d", 0.6)], [("d", 1.0)], [], [("d", -2.0)]]
    x = torch.randn(sum(lengths), 16)
    offsets = torch.tensor([0, 3, 3, 8, 9])
    lora.select(rows, seq_offsets=offsets)
    with torch.no_grad():
        packed = model(x)
        packed_batched = model(x[None])[0]  # [1, T, hidden] works too
    assert torch.equal(packed, packed_batched)
    with pytest.raises(ValueError, match="packed"):
        with torch.no_grad():
            model(x[:-1])
    for s, row in enumerate(rows):
        if lengths[s] == 0:
            continue
        segment = x[offsets[s] : offsets[s + 1]]
        with lora.selection([row]), torch.no_grad():
            alone = model(segment[None])[0]
        torch.testing.assert_close(packed[offsets[s] : offsets[s + 1]], alone, rtol=1e-5, atol=1e-6)
    # The tensor form with seq_offsets gives the same.
    u, d = lora.names.index("u"), lora.names.index("d")
    lora.select(
        (
            torch.tensor([[u, d], [d, -1], [-1, -1], [d, -1]]),
            torch.tensor([[0.4, 0.6], [1.0, 0], [0, 0], [-2.0, 0]]),
        ),
        seq_offsets=offsets,
    )
    with torch.no_grad():
        assert torch.equal(model(x), packed)
    with pytest.raises(ValueError, match="seq_offsets"):
        lora.select(rows, seq_offsets=torch.tensor([0, 3, 3, 8]))


def test_half_precision_model_keeps_its_dtype(arch_setup):
    base, paths, _ = arch_setup("llama")
    model = copy.deepcopy(base).to(torch.bfloat16)
    lora = dlp.attach(model, paths)
    layer = lora.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.bfloat16
    assert layer.weight is model.model.layers[0].self_attn.q_proj.base.weight
    ids = ids_for(2, 4, seed=12)
    lora.select([[("a", 0.5), ("b", 0.5)], [("b", 1.0)]])
    got = run(model, ids).float()
    full = copy.deepcopy(base)
    dlp.attach(full, paths).select([[("a", 0.5), ("b", 0.5)], [("b", 1.0)]])
    assert rel_error(got, run(full, ids)) < 5e-2  # bf16 weights and activations through the whole model
