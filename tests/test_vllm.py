"""dlplora_triton.integrations.vllm: our kernels as vLLM's LoRA backend.

The checks that need vLLM run in one subprocess (tests/vllm_checks.py: vLLM's real LoRA layers with
our wrapper against PunicaWrapperCPU and vLLM's Triton ops, mixes, routes, the plugin, TP = 2), so
that importing vLLM never touches this pytest process; each of its cases is one test here. They skip
where vLLM is not installed (``make test`` installs it). The rest runs without vLLM.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_checks import CASES

from dlplora_triton.integrations import vllm_mix

ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make test installs vllm==0.33.0 and requirements/vllm-layers.txt)")
    out = tmp_path_factory.mktemp("vllm") / "results.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.update(OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_checks.py"), str(out)],
        env=env,
        cwd=str(out.parent),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"tests/vllm_checks.py exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_vllm_layers(vllm_results, case):
    result = vllm_results[case]
    assert result["ok"], result["detail"]


def test_import_does_not_load_vllm():
    code = "import sys, dlplora_triton, dlplora_triton.integrations; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(ROOT)).returncode == 0


def test_entry_point_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    assert plugins["dlplora"] == "dlplora_triton.integrations.vllm:register"
    assert "vllm" in project["optional-dependencies"]


def test_slot_routing_plain_is_vllms_mapping():
    slots = torch.tensor([[0], [0], [-1], [2], [1]])
    ids, weights, plain = vllm_mix.slot_routing([1, 2, 3, None], slots)
    assert ids.tolist() == [[0], [0], [-1], [2], [1]]
    assert weights[ids >= 0].eq(1).all() and plain.all()


def test_slot_routing_expands_mixes():
    vllm_mix.register_mix(50, [(3, 0.25), (1, -0.5)])
    try:
        ids, weights, plain = vllm_mix.slot_routing([1, 2, 3, 50], torch.tensor([[3], [1], [-1]]))
    finally:
        vllm_mix.unregister_mix(50)
    assert ids.tolist() == [[2, 0], [1, -1], [-1, -1]]
    assert weights.tolist() == [[0.25, -0.5], [1.0, 0.0], [0.0, 0.0]]
    assert plain.tolist() == [False, True, True]


def test_slot_routing_route_weights_multiply_mix_weights():
    vllm_mix.register_mix(50, [(3, 0.5), (1, 0.5)])
    try:
        ids, weights, plain = vllm_mix.slot_routing(
            [1, 2, 3, 50], torch.tensor([[3, 1], [0, -1]]), torch.tensor([[0.4, 2.0], [0.0, 1.0]])
        )
    finally:
        vllm_mix.unregister_mix(50)
    assert ids.tolist() == [[2, 0, 1], [-1, -1, -1]]  # a zero weight adds nothing, so its slot is dropped
    assert torch.allclose(weights, torch.tensor([[0.2, 0.2, 2.0], [0.0, 0.0, 0.0]]))
    assert not plain.any()


def test_slot_routing_missing_component_names_it():
    vllm_mix.register_mix(50, [(9, 1.0)])
    try:
        with pytest.raises(KeyError, match="component adapter 9"):
            vllm_mix.slot_routing([1, 50], torch.tensor([[1]]))
    finally:
        vllm_mix.unregister_mix(50)


@pytest.mark.parametrize(
    "components, words",
    [
        ([], "no components"),
        ([(1, 0.5), (1, 0.5)], "twice"),
        ([(1, float("inf"))], "not finite"),
        ([(50, 1.0)], "differ"),
    ],
)
def test_register_mix_errors(components, words):
    with pytest.raises(ValueError, match=words):
        vllm_mix.register_mix(50, components)


def test_parse_mix_name():
    assert vllm_mix.parse_mix_name("mix:math=0.7, code = -0.3") == [("math", 0.7), ("code", -0.3)]
    assert vllm_mix.parse_mix_name("math") is None
    for bad, words in (("mix:", "adapter=weight"), ("mix:a=1,a=2", "twice"), ("mix:a=nan", "not finite")):
        with pytest.raises(ValueError, match=words):
            vllm_mix.parse_mix_name(bad)


def test_mix_dir_is_content_addressed(tmp_path):
    (tmp_path / "a").mkdir()
    comps = [{"name": "a", "lora_int_id": 1, "lora_path": str(tmp_path / "a"), "weight": 0.5}]
    path, mix_id = vllm_mix.write_mix_dir(comps, str(tmp_path / "mixes"))
    assert (path, mix_id) == vllm_mix.write_mix_dir(comps, str(tmp_path / "mixes"))
    other, other_id = vllm_mix.write_mix_dir([dict(comps[0], weight=0.6)], str(tmp_path / "mixes"))
    assert other != path and other_id != mix_id and mix_id > 0
    assert vllm_mix.read_mix_dir(path)[0]["weight"] == 0.5
    with pytest.raises(FileNotFoundError, match="nope"):
        vllm_mix.write_mix_dir([dict(comps[0], lora_path=str(tmp_path / "nope"))], str(tmp_path / "mixes"))


def test_route_mapping_shapes():
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        vllm_mix.LoRARouteMapping([[1, 2]], [[1.0]]).tensors()
    ids, weights = vllm_mix.LoRARouteMapping([[1, 0]], [[0.5, 0.0]]).tensors()
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
