"""Reading PEFT adapter directories: what PEFT wrote is what we read, and every problem is named."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from peft_helpers import save_adapter
from torch import nn

from dlplora_triton.adapters import _matches_target, load_adapter, read_adapter_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def tiny_llama(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=61,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config).eval()


class Mixed(nn.Module):
    """A custom model with a conv, an embedding and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def edit_config(path, **changes) -> None:
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------------------------------------- reading


def test_reads_ranks_scales_and_tensors_as_peft_does(tmp_path):
    base = tiny_llama()
    path = save_adapter(
        base,
        tmp_path / "pat",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 7},
        alpha_pattern={"gate_proj": 3},
    )
    loaded = load_adapter("pat", path, modules_of(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    assert set(peft_layers) == set(loaded.modules) == set(loaded.info.targets)
    assert len(loaded.modules) == 6
    for path_, module in loaded.modules.items():
        peft_layer = peft_layers[path_]
        assert module.rank == peft_layer.r["default"]
        assert module.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
        assert torch.equal(module.lora_a, peft_layer.lora_A["default"].weight)
        assert torch.equal(module.lora_b, peft_layer.lora_B["default"].weight)
    info = loaded.info
    assert (info.name, info.rank, info.alpha, info.use_rslora) == ("pat", 4, 8.0, True)
    assert info.module_ranks["model.layers.1.self_attn.q_proj"] == 7
    assert info.module_ranks["model.layers.0.self_attn.q_proj"] == 4
    assert info.module_scales["model.layers.0.mlp.gate_proj"] == pytest.approx(3 / 4**0.5)
    assert info.targets_summary == "gate_proj,q_proj,v_proj"


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    path = save_adapter(
        base, tmp_path / "g", r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    loaded = load_adapter("g", path, modules_of(base))
    assert loaded.info.fan_in_fan_out
    c_attn = loaded.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.lora_a.shape == (3, 32) and c_attn.lora_b.shape == (96, 3)  # PEFT keeps Linear layout
    assert c_attn.scale == 2.0


TARGET_CONFIGS = {
    "list": dict(target_modules=["q_proj", "down_proj"]),
    "full-name": dict(target_modules=["model.layers.0.self_attn.k_proj", "v_proj"]),
    "regex": dict(target_modules=r".*layers\.1\.(self_attn|mlp)\.(q|up)_proj"),
    "layers-list": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "layers-int": dict(target_modules=["o_proj"], layers_to_transform=0),
    "layers-pattern": dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"),
    "exclude-list": dict(
        target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]
    ),
    "exclude-regex": dict(
        target_modules=["up_proj", "down_proj"], exclude_modules=r".*layers\.1\.mlp\.down_proj"
    ),
}


@pytest.mark.parametrize("name", list(TARGET_CONFIGS))
def test_target_matching_agrees_with_peft(name, tmp_path):
    base = tiny_llama()
    config = LoraConfig(r=2, **TARGET_CONFIGS[name])
    config.save_pretrained(str(tmp_path))
    ours = read_adapter_config(tmp_path, name)
    keys = [k for k, m in base.named_modules() if isinstance(m, nn.Linear)]
    expected = {k for k in keys if check_target_module_exists(config, k)}  # PEFT's excluded marker is falsy
    assert {k for k in keys if _matches_target(ours, k)} == expected
    assert expected  # every config selects something
    # And a saved adapter with this config loads, adapting exactly those modules.
    path = save_adapter(base, tmp_path / "adapter", **TARGET_CONFIGS[name], r=2)
    assert set(load_adapter(name, path, modules_of(base)).modules) == expected


# ------------------------------------------------------------------------------------------- refusals


def _mixed_adapter(tmp_path, **config):
    base = Mixed()
    return base, save_adapter(base, tmp_path / "m", r=2, **config)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["lin"], use_dora=True), "DoRA"),
        (dict(target_modules=["lin"], modules_to_save=["emb"]), "modules_to_save"),
        (dict(target_modules=["lin"], bias="all"), "bias='all'"),
        (dict(target_modules=["lin"], bias="lora_only"), "bias='lora_only'"),
        (dict(target_modules=["lin"], lora_bias=True), "LoRA bias"),
        (dict(target_modules=["emb"]), "embedding"),
        (dict(target_modules=["conv"]), "Conv2d"),
    ],
    ids=["dora", "modules_to_save", "bias-all", "bias-lora_only", "lora_bias", "embedding", "conv"],
)
def test_unsupported_features_raise_naming_adapter_and_feature(config, match, tmp_path):
    base, path = _mixed_adapter(tmp_path, **config)
    with pytest.raises(ValueError, match=match) as info:
        load_adapter("special", path, modules_of(base))
    assert "'special'" in str(info.value)


def test_unsupported_tensor_without_config_flag(tmp_path):
    """A DoRA tensor in the file is refused even if the config does not say use_dora."""
    base, path = _mixed_adapter(tmp_path, target_modules=["lin"], use_dora=True)
    edit_config(path, use_dora=False)
    with pytest.raises(ValueError, match="'special'.*DoRA.*lora_magnitude_vector"):
        load_adapter("special", path, modules_of(base))


def test_non_lora_peft_type_and_bin_only(tmp_path):
    base = Mixed()
    path = save_adapter(base, tmp_path / "ia3", r=2, target_modules=["lin"])
    edit_config(path, peft_type="IA3")
    with pytest.raises(ValueError, match="'x'.*PEFT type 'IA3'"):
        load_adapter("x", path, modules_of(base))
    path = save_adapter(base, tmp_path / "bin", r=2, target_modules=["lin"], safe=False)
    assert os.path.exists(os.path.join(path, "adapter_model.bin"))
    with pytest.raises(ValueError, match="'old'.*adapter_model.bin"):
        load_adapter("old", path, modules_of(base))


def test_missing_paths_raise_file_not_found(tmp_path):
    base = Mixed()
    with pytest.raises(FileNotFoundError, match="'gone'.*no such directory"):
        load_adapter("gone", tmp_path / "nowhere", modules_of(base))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'empty'.*adapter_config.json"):
        load_adapter("empty", tmp_path / "empty", modules_of(base))
    path = save_adapter(base, tmp_path / "noweights", r=2, target_modules=["lin"])
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="'noweights'.*adapter_model.safetensors"):
        load_adapter("noweights", path, modules_of(base))
    file_path = tmp_path / "file.txt"
    file_path.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_adapter("file", file_path, modules_of(base))


def test_shapes_checked_against_the_model(tmp_path):
    small, wide = tiny_llama(32), tiny_llama(48)
    path = save_adapter(wide, tmp_path / "wide", r=4, target_modules=["q_proj"])
    with pytest.raises(
        ValueError, match=r"'wide'.*model\.layers\.0\.self_attn\.q_proj.*does not fit.*\[r, 32\]"
    ):
        load_adapter("wide", path, modules_of(small))
    gpt2_path = save_adapter(
        tiny_gpt2(), tmp_path / "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True
    )
    with pytest.raises(ValueError, match=r"'gpt2'.*transformer\.h\.0\.attn\.c_attn.*does not have"):
        load_adapter("gpt2", gpt2_path, modules_of(small))


def test_config_must_agree_with_tensors(tmp_path):
    base = tiny_llama()
    modules = modules_of(base)
    path = save_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])
    edit_config(path, r=8)
    with pytest.raises(ValueError, match="'a'.*rank 4 but the config says 8"):
        load_adapter("a", path, modules)
    edit_config(path, r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'a'.*v_proj.*target_modules"):
        load_adapter("a", path, modules)
    edit_config(path, target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(ValueError, match="'a'.*no weights for.*k_proj"):
        load_adapter("a", path, modules)
    edit_config(path, target_modules=["q_proj", "v_proj"])
    load_adapter("a", path, modules)  # consistent again
    weights = os.path.join(path, "adapter_model.safetensors")
    state = load_file(weights)
    del state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="'a'.*q_proj.*no lora_B"):
        load_adapter("a", path, modules)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(lora_alpha="big"), "lora_alpha"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(rank_pattern={"q_proj": -1}), "rank_pattern"),
        (dict(alpha_pattern=[1]), "alpha_pattern"),
    ],
    ids=["r", "alpha", "targets-empty", "targets-regex", "rank-pattern", "alpha-pattern"],
)
def test_bad_config_values(changes, match, tmp_path):
    base = Mixed()
    path = save_adapter(base, tmp_path / "c", r=2, target_modules=["lin"])
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=f"'c'.*{match}"):
        read_adapter_config(path, "c")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter_config(tmp_path / "bad", "bad")
