"""The `dlplora` command, the wheel's contents, and the checkout's kernels/ folder never shadowing
another distribution's top-level ``kernels`` (Hugging Face's, which transformers >= 5.25 imports)."""

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from dlplora_triton.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_random_demo_runs_and_checks_its_output(capsys):
    assert main(["demo", "--device", "cpu", "--random", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "relative error vs the float64 reference" in printed
    assert "RANDOM weights" in printed and "logits vs PEFT" in printed
    assert "all outputs match" in printed
    # the quick form prints no timings anywhere (one run is noise)
    assert "timings: none in the quick form" in printed and not re.search(r"\d ms\b", printed), printed


def test_bad_device_exits_2_with_one_line(capsys):
    assert main(["demo", "--device", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'nope'" in err[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package's wheel, built once for this module."""
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("dlplora_triton-*.whl")
    return built


def test_wheel_ships_the_kernels(wheel):
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
    for task in (
        "code",
        "de",
        "fr",
        "ja",
        "ru",
        "zh",
    ):  # the demo's adapters (tests/package/test_wheel_demo.py)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert f"dlplora_triton/data/adapters/smollm2/{task}/{file}" in names


# -- kernels/ never shadows Hugging Face's `kernels` -----------------------------------------------------

try:
    HF_KERNELS = importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    HF_KERNELS = None
needs_hf_kernels = pytest.mark.skipif(HF_KERNELS is None, reason="Hugging Face's kernels is not installed")

# Run in a fresh interpreter: which `kernels` an import finds, what transformers' hub-kernels integration
# imports, and where dlplora_triton.kernels comes from.
IMPORTS = """
import os, sys
import kernels
print("KERNELS", os.path.realpath(kernels.__file__))
from transformers.integrations import hub_kernels  # imports Hugging Face's kernels (transformers >= 5.25)
import dlplora_triton.kernels as ours
print("OURS", os.path.realpath(ours.__file__), ours.shrink_config.__name__)
"""


def _imports(cwd: Path, first_path: Path | None = None) -> dict[str, str]:
    prefix = f"import sys; sys.path.insert(0, {str(first_path)!r})\n" if first_path else ""
    proc = subprocess.run(
        [sys.executable, "-c", prefix + IMPORTS], cwd=str(cwd), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("KERNELS", "OURS"))
    )


def _hf_kernels_init() -> str:
    return str(Path(HF_KERNELS.locate_file("kernels/__init__.py")).resolve())


@needs_hf_kernels
def test_root_on_sys_path_imports_hugging_faces_kernels():
    # `python -c` from the root puts the root first on sys.path, as `python -m pytest` does.
    found = _imports(cwd=ROOT)
    assert found["KERNELS"] == _hf_kernels_init()
    assert found["OURS"] == f"{(ROOT / 'kernels' / '__init__.py').resolve()} shrink_config"


@needs_hf_kernels
def test_root_as_first_sys_path_entry_elsewhere(tmp_path):
    found = _imports(cwd=tmp_path, first_path=ROOT)
    assert found["KERNELS"] == _hf_kernels_init()
    assert found["OURS"].startswith(str((ROOT / "kernels").resolve()))


@needs_hf_kernels
def test_built_wheel_gives_our_kernels_and_leaves_theirs(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # The unpacked wheel first, the checkout's root second: still no shadowing.
    code = f"import sys; sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]\n" + IMPORTS
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert found["KERNELS"] == _hf_kernels_init()
    assert found["OURS"] == f"{(site / 'dlplora_triton' / 'kernels' / '__init__.py').resolve()} shrink_config"


def test_without_an_installed_kernels_the_folder_is_an_empty_namespace(tmp_path):
    # Only the standard library and the root on sys.path: `import kernels` gives what Python makes of a
    # folder without __init__.py (no __file__, no version, nothing inside), which transformers' check
    # for Hugging Face's kernels reads as "not installed"; none of our kernels leak out under that name.
    stdlib = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    code = (
        f"import sys; sys.path[:] = [{str(ROOT)!r}] + {stdlib!r}\n"
        "import kernels\n"
        "print(kernels.__file__, getattr(kernels, '__version__', None), list(kernels.__path__),\n"
        "      [n for n in vars(kernels) if not n.startswith('__')])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=str(tmp_path), capture_output=True, text=True
    )
    assert proc.stdout.strip() == "None None [] []", proc.stdout + proc.stderr


def test_the_lazy_public_names_are_the_modules_own():
    import dlplora_triton as dlp
    from dlplora_triton import generation, milora, ops, patch, plan, routing

    assert dlp.attach is patch.attach and dlp.Router is routing.Router and dlp.MiLoRA is milora.MiLoRA
    assert dlp.fused_lora is ops.fused_lora and dlp.build_plan is plan.build_plan
    assert dlp.generate_routed is generation.generate_routed
    assert all(callable(getattr(dlp, name)) for name in dlp.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        dlp.no_such_name  # noqa: B018
