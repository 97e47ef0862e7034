"""dlplora_triton: Triton kernels for dynamic, sentence-level fusion of many task LoRAs.

- Kernel level: :func:`fused_lora` (stateless) and :func:`build_plan` + :func:`fused_lora_planned`
  (the hot path: one plan per forward pass, shared by every adapted layer).
- Model level: :func:`attach` PEFT adapters to a transformers model, then ``select`` per-row mixes.
- Routing: :class:`Router` (DLP-LoRA's sentence router), :func:`top_p_select`, and
  :func:`generate_routed` (route once at prefill, reuse through decode).
- MiLoRA: :class:`MiLoRA` trains per-layer module routers with their LoRAs; ``attach`` serves it.

The public names are imported on first use (PEP 562): ``import dlplora_triton`` alone loads no torch, so
the ``dlplora`` command line, which imports the package, answers ``--help`` and bad arguments fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .generation import RoutedGeneration, generate_routed
    from .layers import MultiLoRALinear
    from .milora import MiLoRA
    from .ops import DTypeError, check_routing, fused_lora, fused_lora_planned
    from .patch import MultiLoRA, attach
    from .plan import LoRAPlan, build_plan
    from .reference import fused_lora_reference
    from .routing import Router, top_p_select

__all__ = [
    "fused_lora",
    "fused_lora_planned",
    "build_plan",
    "LoRAPlan",
    "check_routing",
    "fused_lora_reference",
    "DTypeError",
    "attach",
    "MultiLoRA",
    "MultiLoRALinear",
    "top_p_select",
    "Router",
    "generate_routed",
    "RoutedGeneration",
    "MiLoRA",
]

# Each name of __all__ -> the submodule that defines it (imported by __getattr__ on first use).
_HOMES = {
    "fused_lora": "ops",
    "fused_lora_planned": "ops",
    "build_plan": "plan",
    "LoRAPlan": "plan",
    "check_routing": "ops",
    "fused_lora_reference": "reference",
    "DTypeError": "ops",
    "attach": "patch",
    "MultiLoRA": "patch",
    "MultiLoRALinear": "layers",
    "top_p_select": "routing",
    "Router": "routing",
    "generate_routed": "generation",
    "RoutedGeneration": "generation",
    "MiLoRA": "milora",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
