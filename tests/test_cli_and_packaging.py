"""The `dlplora` command and the wheel's contents."""

import subprocess
import sys
import zipfile
from pathlib import Path

from dlplora_triton.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_checks_its_output(capsys):
    assert main(["demo", "--device", "cpu", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "relative error vs the float64 reference" in printed
    assert "RANDOM weights" in printed and "PEFT mixed batch" in printed
    assert "all outputs match" in printed


def test_bad_device_exits_2_with_one_line(capsys):
    assert main(["demo", "--device", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'nope'" in err[0]


def test_wheel_ships_the_kernels(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dlplora_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("lora_shrink.py", "lora_expand.py", "configs.py", "_common.py", "__init__.py"):
        assert f"dlplora_triton/kernels/{module}" in names
    # Every subpackage of the source tree is in the wheel (pyproject.toml lists them one by one).
    for init in (ROOT / "dlplora_triton").glob("*/__init__.py"):
        package = init.parent.relative_to(ROOT).as_posix()
        for module in init.parent.glob("*.py"):
            assert f"{package}/{module.name}" in names, f"{package}/{module.name} is not in the wheel"
    assert "dlplora_triton/ops.py" in names
    assert "dlplora_triton/data/router_texts.jsonl" in names
    assert "dlplora_triton/data/NOTICE" in names
