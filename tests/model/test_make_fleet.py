"""bench/make_fleet.py: the adapter fleet of the engine tests and benchmarks, on a tiny Llama's config.

Seeded and reused as documented, every rank and target set present, and each kind of adapter read by
PEFT and by ``attach`` into the same model, which it visibly changes.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import peft_helpers
import pytest
import torch
from lora_cases import rel_error
from safetensors.torch import load_file

import dlplora_triton as dlp
from dlplora_triton.adapters import check_adapter_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import make_fleet  # noqa: E402

REL_TOL = 1e-4  # fp32, as tests/model/test_patch.py


@pytest.fixture(scope="module")
def base():
    return peft_helpers.make_model("llama")


def fleet(base, out, count=6, seed=0):
    return make_fleet.write_fleet(out, count, seed=seed, config=base.config.to_dict())


def files_of(adapters):
    return {
        (a["name"], f): (Path(a["path"]) / f).read_bytes()
        for a in adapters
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }


def test_seeded_and_listed(base, tmp_path):
    adapters = fleet(base, tmp_path / "a")
    assert files_of(adapters) == files_of(fleet(base, tmp_path / "b"))
    # Adapter i depends on (seed, i) only: a smaller fleet is the start of a larger one.
    assert files_of(fleet(base, tmp_path / "c", count=3)) == {
        k: v for k, v in files_of(adapters).items() if k[0] in ("a000", "a001", "a002")
    }
    other = files_of(fleet(base, tmp_path / "d", seed=1))
    assert all(other[k] != v for k, v in files_of(adapters).items() if k[1] == "adapter_model.safetensors")

    manifest = json.loads((tmp_path / "a" / "fleet.json").read_text())
    assert manifest["count"] == 6 and manifest["seed"] == 0
    assert [a["name"] for a in adapters] == [f"a00{i}" for i in range(6)]
    assert {a["rank"] for a in adapters} == set(make_fleet.RANKS)
    assert {a["kind"] for a in adapters} == set(make_fleet.KINDS)
    assert [a["name"] for a in adapters if a["rank_pattern"]] == ["a003"]
    layers = base.config.num_hidden_layers
    for a in adapters:
        path = Path(a["path"])
        config = json.loads((path / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
        assert config["target_modules"] == a["targets"] == list(make_fleet.KINDS[a["kind"]])
        assert config["r"] == a["rank"] and bool(config["rank_pattern"]) == a["rank_pattern"]
        assert a["max_rank"] == max([a["rank"], *config["rank_pattern"].values()]) <= 64
        assert a["bytes"] == sum(f.stat().st_size for f in path.iterdir())
        tensors = load_file(path / "adapter_model.safetensors")
        assert len(tensors) == 2 * layers * len(a["targets"])
        assert all(t.dtype == torch.float32 for t in tensors.values())
        assert max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")) == a["max_rank"]
        assert check_adapter_dir(path, 64, a["name"], values=True) == a["max_rank"]


def test_rerun_reuses_and_rewrites(base, tmp_path):
    out = tmp_path / "fleet"
    fleet(base, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    fleet(base, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    # Other arguments rewrite it; the old fleet's extra adapters go.
    assert [a["name"] for a in fleet(base, out, count=4, seed=2)] == ["a000", "a001", "a002", "a003"]
    assert sorted(p.name for p in out.iterdir()) == ["a000", "a001", "a002", "a003", "fleet.json"]
    # A fleet with a file missing (a run cut off, a file removed) is rewritten.
    (out / "a001" / "adapter_model.safetensors").unlink()
    fleet(base, out, count=4, seed=2)
    assert (out / "a001" / "adapter_model.safetensors").is_file()


def test_peft_and_attach_agree(base, tmp_path):
    """One adapter per target set and the one with rank_pattern: PEFT's logits are attach's, and each
    moves the logits visibly."""
    adapters = fleet(base, tmp_path, count=4)
    paths = {a["name"]: a["path"] for a in adapters}
    oracle = peft_helpers.PeftOracle(base, paths)
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    ids = torch.randint(3, peft_helpers.VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    base_logits = peft_helpers.run(base, ids)
    for name in paths:
        lora.select([[(name, 1.0)]])
        ours = peft_helpers.run(model, ids)
        assert rel_error(ours, oracle.logits([(name, 1.0)], ids)) < REL_TOL, name
        assert rel_error(ours, base_logits) > 1e-2, name
