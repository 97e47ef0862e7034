"""dlplora_triton.integrations.vllm: our kernels as vLLM's LoRA backend.

The checks that need vLLM run in one subprocess (tests/integrations/vllm/vllm_checks.py: vLLM's real LoRA layers with
our wrapper against PunicaWrapperCPU and vLLM's Triton ops, mixes as routes, empty batches, the engine
hooks, the plugin, vLLM's LoRA managers against PEFT, TP = 2), so
that importing vLLM never touches this pytest process; each of its cases is one test here. They skip
where vLLM is not installed (``make test`` installs it). The rest runs without vLLM.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from vllm_checks import CASES

from dlplora_triton.integrations.vllm import mixes

ROOT = Path(__file__).resolve().parents[3]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip(
            "vLLM is not installed (make test installs vllm==0.33.0 and requirements/vllm-layers.txt)"
        )
    out = tmp_path_factory.mktemp("vllm") / "results.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.update(OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "integrations" / "vllm" / "vllm_checks.py"), str(out)],
        env=env,
        cwd=str(out.parent),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"tests/integrations/vllm/vllm_checks.py exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
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
    ids, weights, plain = mixes.slot_routing(4, slots)
    assert ids.tolist() == [[0], [0], [-1], [2], [1]]
    assert weights[ids >= 0].eq(1).all() and weights[ids < 0].eq(0).all() and plain.all()


def test_slot_routing_route_weights():
    slots = torch.tensor([[2, 0], [1, -1], [-1, -1], [3, -1]])
    weights = torch.tensor([[0.25, -0.5], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    ids, w, plain = mixes.slot_routing(4, slots, weights)
    assert ids.tolist() == [[2, 0], [1, -1], [-1, -1], [3, -1]]
    assert w.tolist() == [[0.25, -0.5], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]
    assert plain.tolist() == [False, True, True, False]  # one slot at weight 1 (or none) is vLLM's case


def test_slot_routing_zero_weights_dropped():
    slots = torch.tensor([[0, 2, 1], [3, 1, -1], [2, -1, -1]])
    weights = torch.tensor([[0.0, 0.4, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    ids, w, plain = mixes.slot_routing(4, slots, weights)
    # A zero weight adds nothing, so its slot is dropped; the used slots are packed first.
    assert ids.tolist() == [[2, 1], [1, -1], [-1, -1]]
    assert torch.allclose(w, torch.tensor([[0.4, 2.0], [1.0, 0.0], [0.0, 0.0]]))
    assert plain.tolist() == [False, True, True]
    ids, w, plain = mixes.slot_routing(4, torch.zeros(0, 2, dtype=torch.int64))
    assert ids.shape == w.shape == (0, 1) and plain.shape == (0,)


def test_slot_routing_bad_slots():
    for bad in ([[4]], [[-2]]):
        with pytest.raises(ValueError, match="slot indices"):
            mixes.slot_routing(4, torch.tensor(bad))


def test_parse_mix_name():
    assert mixes.parse_mix_name("mix:math=0.7,code=-0.3") == [("math", 0.7), ("code", -0.3)]
    assert mixes.parse_mix_name("mix:de-v2.1=1e-3,x_y=2") == [("de-v2.1", 1e-3), ("x_y", 2.0)]
    assert mixes.parse_mix_name("mix:a=+.5,b=3.,c=-2E+2") == [("a", 0.5), ("b", 3.0), ("c", -200.0)]
    bounds = [("a", 1e3), ("b", -1e3), ("c", 1.0)]  # the weight range's ends are served
    assert mixes.parse_mix_name("mix:a=1000,b=-1e3,c=1") == bounds
    assert mixes.parse_mix_name("math") is None and mixes.parse_mix_name(None) is None
    many = "mix:" + ",".join(f"a{i}=1" for i in range(4))
    assert len(mixes.parse_mix_name(many, max_components=4)) == 4
    pairs = [("de", 0.7), ("code", -0.3)]
    assert mixes.parse_mix_name(mixes.canonical_mix_name(pairs)) == pairs


@pytest.mark.parametrize(
    "name, words",
    [
        ("mix:", "names no adapter"),
        ("mix:  ", "is not .adapter=weight."),
        ("mix:a=", "adapter=weight"),
        ("mix:a", "adapter=weight"),
        ("mix:=1", "adapter=weight"),
        ("mix:a=1,", "adapter=weight"),
        ("mix:a=x", "not a number"),
        ("mix:a=nan", "not a number"),
        ("mix:a=1e999", "not finite"),
        ("mix:a=inf", "not a number"),
        ("mix:a=1,a=2", "twice"),
        ("mix:../x=1", "not an adapter name"),
        ("mix:a/b=1", "not an adapter name"),
        ("mix:.hidden=1", "not an adapter name"),
        ("mix:" + ",".join(f"a{i}=1" for i in range(64)), "64 components"),
        ("mix:a=0.5,b=-0.5", "sum to 0"),
        ("mix:a=0", "sum to 0"),
        ("mix:a=-0", "sum to 0"),
        ("mix:a=1e39", "outside"),
        ("mix:a=-1e39,b=1", "outside"),
        ("mix:a=1000.001", "outside"),
        ("mix:a=3e38", "outside"),
        ("mix:a=1e-50", "is 0 in float32"),
        ("mix:a=1_0", "not a number"),
        ("mix:a=\u0661", "not a number"),  # an Arabic-Indic digit: float() reads it
        ("mix:a=0x10", "not a number"),
        ("mix:a=1" + "0" * 80, "not a number"),  # over 64 characters
        ("mix:a\n=1", "not an adapter name"),
        ("mix: a=1", "not an adapter name"),
        ("mix:a= 1", "not a number"),
        ("mix:\u0430=1", "not an adapter name"),  # Cyrillic a
        ("mix:a\x00=1", "not an adapter name"),
    ],
)
def test_parse_mix_name_errors(name, words):
    with pytest.raises(ValueError, match=words):
        mixes.parse_mix_name(name, max_components=4)


def test_a_huge_mix_name_is_refused_at_once():
    # 40,000 components: the component count is checked before anything else is parsed.
    name = "mix:" + ",".join(f"a{i}=1" for i in range(40_000))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="40000 components"):
        mixes.parse_mix_name(name, max_components=4)
    assert time.perf_counter() - start < 0.1
    with pytest.raises(ValueError, match="twice"):  # without a cap: linear, not quadratic
        mixes.parse_mix_name(name + ",a0=1")


def test_check_weight():
    assert mixes.check_weight(2, "w") == 2.0 and mixes.check_weight(-0.5, "w") == -0.5
    for bad, words in [
        (10**400, "not finite"),
        (1e30, "outside"),
        (float("nan"), "not finite"),
        (True, "number"),
        ("1", "number"),
    ]:
        with pytest.raises(ValueError, match=words):
            mixes.check_weight(bad, "w")


def test_mix_args_are_signed_and_checked(monkeypatch):
    monkeypatch.setenv(mixes.MIX_KEY_ENV, "k1")
    components = (mixes.MixComponent("de", 1, "/ad/de", 0.7),)
    args = mixes.mix_args(components)
    assert mixes.decode_mix(mixes.verify_mix_args(args)) == components
    forged = [
        {mixes.MIX_ARG: args[mixes.MIX_ARG]},  # no signature
        {
            mixes.MIX_ARG: args[mixes.MIX_ARG].replace("/ad/de", "/tmp/x"),
            mixes.MIX_SIGNATURE_ARG: args[mixes.MIX_SIGNATURE_ARG],
        },
        {mixes.MIX_ARG: args[mixes.MIX_ARG], mixes.MIX_SIGNATURE_ARG: "0" * 64},
        {mixes.MIX_ARG: args[mixes.MIX_ARG], mixes.MIX_SIGNATURE_ARG: 7},
    ]
    for extra in forged:
        with pytest.raises(ValueError, match="signature"):
            mixes.verify_mix_args(extra)
    monkeypatch.setenv(mixes.MIX_KEY_ENV, "k2")  # another deployment's key
    with pytest.raises(ValueError, match="signature"):
        mixes.verify_mix_args(args)


def test_the_mix_key_is_made_once_and_inherited(monkeypatch):
    monkeypatch.delenv(mixes.MIX_KEY_ENV, raising=False)
    key = mixes.mix_key()
    assert len(key) == 64 and os.environ[mixes.MIX_KEY_ENV] == key.decode() and mixes.mix_key() == key


def test_encode_decode_mix_round_trip():
    components = (
        mixes.MixComponent("de", 1, "/ad/de", 0.7),
        mixes.MixComponent("code", 7, "/ad/code", -0.25),
        mixes.MixComponent("zero", 3, "/ad/zero", 0.0),
    )
    text = mixes.encode_mix(components)
    assert isinstance(text, str) and mixes.decode_mix(text) == components
    assert mixes.decode_mix(json.loads(text)) == components  # the parsed list works too

    class Params:
        extra_args = {mixes.MIX_ARG: text, "other": 1}

    class Plain:
        extra_args = None

    assert mixes.request_mix(Params()) == components
    assert mixes.request_mix(Plain()) is None and mixes.request_mix(None) is None


@pytest.mark.parametrize(
    "value, words",
    [
        ("{not json", "not JSON"),
        ("[]", "non-empty list"),
        ('{"a": 1}', "non-empty list"),
        ('[["a", 1, "/p"]]', "is not"),
        ('[["a", 0, "/p", 1.0]]', "is not"),
        ('[["a", -2, "/p", 1.0]]', "is not"),
        ('[["a", true, "/p", 1.0]]', "is not"),
        ('[["a", 1.5, "/p", 1.0]]', "is not"),
        ('[["a", 1, "/p", "1"]]', "is not"),
        ('[["a", 1, "/p", NaN]]', "is not"),
        ('[["a", 1, "/p", Infinity]]', "is not"),
        ('[["a", 1, null, 1.0]]', "is not"),
        ('[["a", 1, "/p", 0.5], ["b", 1, "/q", 0.5]]', "twice"),
        ('[["a", 1, "/p", 1e39]]', "outside"),
        ('[["a", 1, "/p", 1' + "0" * 400 + "]]", "not finite"),
    ],
)
def test_decode_mix_errors(value, words):
    with pytest.raises(ValueError, match=words):
        mixes.decode_mix(value)


def test_route_mapping_shapes():
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        mixes.LoRARouteMapping([[1, 2]], [[1.0]]).tensors()
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        mixes.LoRARouteMapping([1, 2], [1.0, 1.0]).tensors()
    with pytest.raises(ValueError, match="finite"):
        mixes.LoRARouteMapping([[1]], [[float("inf")]]).tensors()
    ids, weights = mixes.LoRARouteMapping([[1, 0]], [[0.5, 0.0]]).tensors()
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (1, 2)
    ids, weights = mixes.LoRARouteMapping(
        torch.tensor([[3]]), torch.tensor([[2.0]], dtype=torch.float64)
    ).tensors()
    assert ids.tolist() == [[3]] and weights.dtype == torch.float32
    ids, weights = mixes.LoRARouteMapping([], []).tensors()  # an empty batch
    assert ids.shape == weights.shape == (0, 1)
