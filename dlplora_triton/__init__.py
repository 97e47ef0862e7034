"""dlplora_triton: Triton kernels for dynamic, sentence-level fusion of many task LoRAs.

- Kernel level: :func:`fused_lora` (stateless) and :func:`build_plan` + :func:`fused_lora_planned`
  (the hot path: one plan per forward pass, shared by every adapted layer).
- Model level: :func:`attach` PEFT adapters to a transformers model, then ``select`` per-row mixes.
- Routing: :class:`Router` (DLP-LoRA's sentence router), :func:`top_p_select`, and
  :func:`generate_routed` (route once at prefill, reuse through decode).
- MiLoRA: :class:`MiLoRA` trains per-layer module routers with their LoRAs; ``attach`` serves it.
"""

from ._version import __version__  # noqa: F401  (re-exported)
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
