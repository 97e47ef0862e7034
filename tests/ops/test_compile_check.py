"""`dlplora compile-check`: the kernels compiled for Hopper with no GPU (the quick sweep, in a subprocess
without TRITON_INTERPRET), the committed full report, and the checks that make it fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlplora_triton import compile_check as cc
from dlplora_triton._cubin import occupancy

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "bench" / "results" / "static" / "compile_check.json"
VARIANT_FIELDS = {"kernel", "arch", "signature", "constexprs", "num_warps", "registers", "spill_bytes"}
VARIANT_FIELDS |= {"shared_bytes", "tensor_core_instructions", "occupancy"}


def _check_report(report: dict, archs: set[str]) -> None:
    assert report["failures"] == []
    assert {v["arch"] for v in report["variants"]} == archs
    for v in report["variants"]:
        assert VARIANT_FIELDS <= set(v), v.get("id")
        assert v["spill_bytes"] == 0
        if v["dtype"] in ("fp16", "bf16"):
            assert sum(v["tensor_core_instructions"].values()) > 0, v["id"]
    design = [r for r in report["shapes"] if r["design_decode"]]
    assert {(r["kernel"], r["arch"]) for r in design} == {
        (k, a) for k in ("_lora_shrink_kernel", "_lora_expand_kernel") for a in archs
    }
    assert min(r["grid_programs"] for r in design) >= 264
    assert max(c["variants"] for c in report["decode_variant_counts"]) <= 4
    ids = {v["id"] for v in report["variants"]}
    assert all(r["variant"] in ids for r in report["shapes"])


def test_quick_check_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    path = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "dlplora_triton.cli", "compile-check", "--quick", "--arch", "sm_90"]
    done = subprocess.run([*cmd, "--json", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(path.read_text())
    _check_report(report, {"sm_90"})
    assert report["quick"] is True
    assert "_lora_expand_kernel" in done.stdout and "variants, 0 failures" in done.stdout


def test_committed_full_report_is_current_and_passes():
    report = json.loads(STATIC.read_text())
    _check_report(report, {"sm_80", "sm_90"})
    assert report["quick"] is False
    assert report["environment"]["source_sha"] == cc.source_sha(), (
        "kernels/ or plan_block_sizes changed since the committed report: re-run "
        "`dlplora compile-check --json bench/results/static/compile_check.json` (and bench/readme_tables.py)"
    )


def test_the_sweep_covers_the_documented_axes():
    shapes = cc.sweep()
    decode = {(s.seqs, s.P) for s in shapes if s.group == "decode"}
    assert decode == {(2**i, p) for i in range(9) for p in (1, 2, 3, 4)}
    assert {(s.seqs, s.tokens_per_seq) for s in shapes if s.group == "prefill"} == {(8, 512), (1, 4096)}
    assert {(s.K, s.N) for s in shapes} >= {(4096, 4096), (4096, 14336), (2049, 1000)}
    assert {s.rank for s in shapes} == {8, 16, 64, 128, "mixed"}
    assert {s.L for s in shapes} == {8, 32, 128}
    assert {s.dtype for s in shapes} == {"fp16", "bf16", "fp32"}
    assert {s.layout for s in shapes} == {"layers", "contiguous"}
    assert sum(s.design_decode for s in shapes) == 6  # 3 dtypes x 2 layouts


def _report(**variant) -> dict:
    base = {"id": "v1", "kernel": "_lora_shrink_kernel", "arch": "sm_90", "dtype": "bf16", "signature": {}}
    base |= {
        "constexprs": {"BLOCK_M": 64},
        "spill_bytes": 0,
        "tensor_core_instructions": {"HGMMA.64x16x16": 4},
    }
    shape = {"design_decode": True, "kernel": "_lora_shrink_kernel", "shape": "decode", "grid_programs": 264}
    count = {
        "kernel": "_lora_shrink_kernel",
        "arch": "sm_90",
        "dtype": "bf16",
        "layer": "K4096",
        "variants": 4,
    }
    return {"variants": [base | variant], "shapes": [shape], "decode_variant_counts": [count]}


@pytest.mark.parametrize(
    "change,message",
    [
        ({}, None),
        ({"spill_bytes": 8}, "spills"),
        ({"tensor_core_instructions": {}}, "without tensor-core"),
        ({"error": "CompilationError: x"}, "compile error"),
    ],
    ids=["clean", "spill", "no_tensor_cores", "compile_error"],
)
def test_failures_name_the_variant_and_the_reason(change, message):
    failures = cc._failures(_report(**change))
    if message is None:
        assert failures == []
    else:
        assert len(failures) == 1 and message in failures[0] and "variant v1" in failures[0]


def test_too_many_decode_variants_or_a_small_design_grid_fail():
    report = _report()
    report["decode_variant_counts"][0]["variants"] = 5
    report["shapes"][0]["grid_programs"] = 263
    failures = cc._failures(report)
    assert any("5 decode variants" in f for f in failures)
    assert any("263 programs" in f for f in failures)


def test_occupancy_limits():
    assert occupancy("sm_90", 128, 0, 4) == {"programs_per_sm": 4, "limited_by": "registers"}
    assert occupancy("sm_90", 24, 0, 4) == {"programs_per_sm": 16, "limited_by": "threads"}
    assert occupancy("sm_80", 32, 100_000, 4) == {"programs_per_sm": 1, "limited_by": "shared"}


def test_bad_arch_and_interpreter_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="--arch"):
        cc.run_check(["sm_75"], quick=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="unset TRITON_INTERPRET"):
        cc.run_check(["sm_90"], quick=True)
