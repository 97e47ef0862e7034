"""dlplora_triton.modules: what a LoRA can wrap, set_child, and PEFT's target rule (checked against PEFT)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft_helpers import make_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from dlplora_triton.modules import linear_features, matches_target, set_child


def test_linear_features():
    assert linear_features(nn.Linear(5, 7)) == (5, 7)
    assert linear_features(Conv1D(7, 5)) == (5, 7)  # Conv1D(nf=out, nx=in), weight [in, out]
    assert linear_features(nn.Embedding(5, 7)) is None
    assert linear_features(nn.Conv2d(3, 4, 3)) is None
    packed = nn.Linear(8, 8)
    packed.weight = nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)  # 4-bit-like
    assert linear_features(packed) is None


def test_set_child_replaces_by_path_and_at_top_level():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Linear(3, 1))
    new = nn.Linear(2, 3)
    set_child(model, "0.0", new)
    assert model[0][0] is new
    top = nn.Linear(3, 1)
    set_child(model, "1", top)
    assert model[1] is top
    with pytest.raises(AttributeError, match="nothing"):
        set_child(model, "nothing.here", new)


# (id, LoraConfig fields): every rule of check_target_module_exists that the matcher follows.
TARGET_CASES = [
    ("list-suffix", dict(target_modules=["q_proj", "down_proj"])),
    ("list-full-name", dict(target_modules=["model.layers.0.self_attn.k_proj", "v_proj"])),
    ("list-partial-name-no-match", dict(target_modules=["proj", "elf_attn.q_proj"])),
    ("list-dotted-suffix", dict(target_modules=["mlp.up_proj", "self_attn.o_proj"])),
    ("regex", dict(target_modules=r".*layers\.1\.(self_attn|mlp)\.(q|up)_proj")),
    ("regex-full-match-no-match", dict(target_modules=r"q_proj")),
    ("layers-list", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("layers-int", dict(target_modules=["o_proj"], layers_to_transform=0)),
    ("layers-empty-list", dict(target_modules=["o_proj"], layers_to_transform=[])),
    ("layers-pattern", dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")),
    (
        "layers-pattern-list",
        dict(target_modules=["gate_proj"], layers_to_transform=[1], layers_pattern=["nothing", "layers"]),
    ),
    (
        "exclude-list",
        dict(target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]),
    ),
    ("exclude-suffix", dict(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"])),
    (
        "exclude-regex",
        dict(target_modules=["up_proj", "down_proj"], exclude_modules=r".*layers\.1\.mlp\.down_proj"),
    ),
]
FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("case_id, case", TARGET_CASES, ids=[i for i, _ in TARGET_CASES])
def test_matches_target_agrees_with_peft(case_id, case, arch):
    model = make_model(arch)
    config = LoraConfig(r=2, **case)
    paths = [p for p, _ in model.named_modules() if p]
    expected = [p for p in paths if check_target_module_exists(config, p)]  # PEFT's excluded marker is falsy
    kwargs = {k: case[k] for k in FIELDS if k in case}
    ours = [p for p in paths if matches_target(p, case["target_modules"], **kwargs)]
    assert ours == expected
    if arch == "llama" and "no-match" not in case_id:
        assert ours  # the table means something on the model its names come from


def test_all_linear_matches_every_path():
    assert matches_target("anything.at.all", "all-linear")
    assert not matches_target("anything.at.all", "all-linear", exclude_modules=["all"])
