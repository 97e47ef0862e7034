"""check_adapter_dir: the serving check of an adapter directory, remembered until a file changes, and
the vLLM engine's arrival hook using it (no vLLM needed: the hook reads plain attributes)."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import dlplora_triton.adapters as adapters
from dlplora_triton.adapters import check_adapter_dir
from dlplora_triton.integrations.vllm import engine
from dlplora_triton.integrations.vllm.mixes import MixComponent, mix_args


def write_adapter(path, r=4, nan=False) -> str:
    """A minimal PEFT LoRA directory: config + safetensors of one q_proj of width 8."""
    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"]}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    prefix = "base_model.model.layers.0.q_proj"
    a = torch.full((r, 8), math.nan) if nan else torch.randn(r, 8)
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": torch.randn(8, r)},
        os.path.join(path, "adapter_model.safetensors"),
    )
    return str(path)


@pytest.fixture
def reads(monkeypatch):
    """Counts of file reads by the check: the config (JSON) and the weights (safetensors opens)."""
    adapters._CHECKED.clear()
    counts = {"config": 0, "weights": 0}
    read_json, safe_open = adapters.read_json_object, safetensors.safe_open

    def counted_json(*args, **kwargs):
        counts["config"] += 1
        return read_json(*args, **kwargs)

    def counted_open(*args, **kwargs):
        counts["weights"] += 1
        return safe_open(*args, **kwargs)

    monkeypatch.setattr(adapters, "read_json_object", counted_json)
    monkeypatch.setattr(safetensors, "safe_open", counted_open)
    yield counts
    adapters._CHECKED.clear()


def test_a_second_check_reads_no_file(tmp_path, reads):
    path = write_adapter(tmp_path / "de", r=4)
    assert check_adapter_dir(path, 16, "adapter 'de'") == 4
    assert reads == {"config": 1, "weights": 1}
    for _ in range(3):
        assert check_adapter_dir(path, 16, "adapter 'de'") == 4
    assert reads == {"config": 1, "weights": 1}
    # The rank bound is the caller's: a remembered rank is still compared with it.
    with pytest.raises(ValueError, match=r"adapter 'de': rank 4 is above this server's max_lora_rank \(2\)"):
        check_adapter_dir(path, 2, "adapter 'de'")
    assert reads == {"config": 1, "weights": 1}


def test_a_symlink_to_a_checked_directory_is_the_same_directory(tmp_path, reads):
    path = write_adapter(tmp_path / "de")
    os.symlink(path, tmp_path / "alias")
    check_adapter_dir(path, None, "adapter 'de'")
    check_adapter_dir(str(tmp_path / "alias"), None, "adapter 'alias'")
    assert reads == {"config": 1, "weights": 1}


@pytest.mark.parametrize("changed", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_changed_file_is_read_again(tmp_path, reads, changed):
    path = write_adapter(tmp_path / "de", r=4)
    check_adapter_dir(path, 16, "adapter 'de'")
    file = os.path.join(path, changed)
    st = os.stat(file)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: a new mtime
    check_adapter_dir(path, 16, "adapter 'de'")
    assert reads == {"config": 2, "weights": 2}


def test_a_rewritten_adapter_is_checked_as_it_is_now(tmp_path, reads):
    path = write_adapter(tmp_path / "de", r=4)
    assert check_adapter_dir(path, 16, "adapter 'de'") == 4
    write_adapter(path, r=8)
    assert check_adapter_dir(path, 16, "adapter 'de'") == 8
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(weights, "r+b") as f:  # truncated in place
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="adapter 'de': adapter_model.safetensors is truncated or corrupt"):
        check_adapter_dir(path, 16, "adapter 'de'")


def test_refusals_are_not_remembered_and_keep_their_messages(tmp_path, reads):
    path = write_adapter(tmp_path / "nan", nan=True)
    for _ in range(2):
        with pytest.raises(
            ValueError, match=r"adapter 'nan': adapter_model.safetensors: tensor .* holds NaN or inf"
        ):
            check_adapter_dir(path, 16, "adapter 'nan'", values=True)
    assert reads["weights"] == 2 and len(adapters._CHECKED) == 0
    pickled = tmp_path / "pickled"
    write_adapter(pickled)
    os.rename(pickled / "adapter_model.safetensors", pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter 'p': holds only adapter_model.bin \(a pickle\)"):
        check_adapter_dir(str(pickled), 16, "adapter 'p'")
    with pytest.raises(FileNotFoundError, match="adapter 'gone': adapter at .*: no such directory"):
        check_adapter_dir(str(tmp_path / "gone"), 16, "adapter 'gone'")


def test_a_header_check_does_not_answer_a_values_check(tmp_path, reads):
    path = write_adapter(tmp_path / "nan", nan=True)
    assert check_adapter_dir(path, 16, "adapter 'nan'") == 4  # the header alone cannot see NaN
    with pytest.raises(ValueError, match="holds NaN or inf"):
        check_adapter_dir(path, 16, "adapter 'nan'", values=True)
    good = write_adapter(tmp_path / "de")
    check_adapter_dir(good, 16, "adapter 'de'", values=True)
    check_adapter_dir(good, 16, "adapter 'de'")  # a values pass answers a header check
    check_adapter_dir(good, 16, "adapter 'de'", values=True)
    assert reads["weights"] == 3  # nan (header), nan (values), de (values)


def test_the_cache_is_bounded_least_recent_first_out(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(adapters._CHECKED, "maxsize", 3)
    paths = [write_adapter(tmp_path / f"a{i}") for i in range(5)]
    for path in paths:
        check_adapter_dir(path, None, "a")
    assert len(adapters._CHECKED) == 3 and reads["weights"] == 5
    check_adapter_dir(paths[4], None, "a")  # kept
    assert reads["weights"] == 5
    check_adapter_dir(paths[0], None, "a")  # dropped first: read again
    assert reads["weights"] == 6 and len(adapters._CHECKED) == 3
    assert adapters._CheckedDirs().maxsize == 1024


def test_the_engines_arrival_hook_checks_each_component_once(tmp_path, reads):
    paths = [write_adapter(tmp_path / name) for name in ("de", "code")]
    components = [
        MixComponent(n, i + 1, p, w) for i, (n, p, w) in enumerate(zip(("de", "code"), paths, (0.7, 0.3)))
    ]
    params = SimpleNamespace(extra_args=mix_args(components))
    anchor = SimpleNamespace(lora_int_id=1, lora_path=paths[0])
    config = SimpleNamespace(max_loras=4, max_lora_rank=16)
    for _ in range(5):
        engine.check_mix_request(params, anchor, config)
    assert reads == {"config": 2, "weights": 2}
    write_adapter(paths[1], r=32)  # rewritten on disk: seen at the next request
    with pytest.raises(
        ValueError, match=r"mix component 'code': rank 32 is above this server's max_lora_rank"
    ):
        engine.check_mix_request(params, anchor, config)
    assert reads == {"config": 3, "weights": 3}
