"""vLLM's LoRA backend on dlplora_triton's kernels, with weighted mixes per request (docs/vllm.md).

Installing the package registers the entry point ``dlplora`` in the group ``vllm.general_plugins``;
vLLM calls :func:`register` in every process it starts (front end, engine core, workers). One file per
job:

- :mod:`.wrapper`: :class:`PunicaWrapperDLP`, the punica wrapper every LoRA layer calls;
- :mod:`.mixes`: mix names, the mix a request carries, :func:`mix_request` (offline ``LLM``);
- :mod:`.engine`: mixes inside the engine (slot accounting, checks on arrival, routes in the workers);
- :mod:`.admission`: which waiting requests may take slots in a step (no mix starves);
- :mod:`.adapter_metrics`: adapter loads and evictions, counted in the workers, on ``/metrics``;
- :mod:`.server`: the OpenAI server's ``mix:`` model names (an ASGI middleware).

``import dlplora_triton`` never imports vLLM; this package imports it only in :func:`register` and in
the modules that need it.
"""

from __future__ import annotations

import logging
import warnings

from dlplora_triton.integrations.vllm.mixes import (
    MIX_ARG,
    MIX_PREFIX,
    LoRARouteMapping,
    MixComponent,
    mix_request,
    parse_mix_name,
)

__all__ = [
    "MIX_ARG",
    "MIX_PREFIX",
    "TESTED_VLLM",
    "LoRARouteMapping",
    "MixComponent",
    "PunicaWrapperDLP",
    "mix_request",
    "parse_mix_name",
    "register",
]

logger = logging.getLogger(__name__)

# The vLLM releases the plugin was tested with (make test): 0.32 runs a whole engine and its OpenAI
# server (vLLM's CPU build, tests/integrations/vllm/engine/), 0.33 vLLM's LoRA layer classes (tests/integrations/vllm/test_vllm.py).
TESTED_VLLM = ("0.32", "0.33")


def __getattr__(name: str):
    if name == "PunicaWrapperDLP":  # imports vLLM
        from dlplora_triton.integrations.vllm.wrapper import PunicaWrapperDLP

        return PunicaWrapperDLP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_vllm_version(version: str) -> bool:
    """True for a tested vLLM release line; otherwise warn once, naming the tested ones."""
    line = ".".join(version.split("+")[0].split(".")[:2])
    if line in TESTED_VLLM:
        return True
    warnings.warn(
        f"dlplora-triton's vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM)}.x, not {version}: "
        "it hooks vLLM internals (the punica wrapper, the scheduler class, the LoRA model runner), so "
        "check its outputs before serving",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the wrapper and the engine hooks for mixes (idempotent)."""
    import vllm
    from vllm.platforms import current_platform

    from dlplora_triton.integrations.vllm.adapter_metrics import install_adapter_metrics, metrics_dir
    from dlplora_triton.integrations.vllm.engine import install_engine_hooks
    from dlplora_triton.integrations.vllm.mixes import mix_key
    from dlplora_triton.integrations.vllm.wrapper import WRAPPER_QUALNAME

    # The key signing mixes, made now (vLLM loads plugins while it parses its arguments) so that every
    # process it starts later, the engine core first, inherits the same one.
    mix_key()
    metrics_dir()  # the same for the folder the processes' adapter counts go to

    platform_cls = type(current_platform)
    if getattr(platform_cls.get_punica_wrapper, "_dlplora", False):
        return
    check_vllm_version(vllm.__version__)

    def get_punica_wrapper(cls) -> str:
        return WRAPPER_QUALNAME

    get_punica_wrapper._dlplora = True
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    install_engine_hooks()
    install_adapter_metrics()
