"""Deprecated module name: top-p selection lives in :mod:`dlplora_triton.routing.top_p` (0.2), a name that
does not read like :mod:`dlplora_triton.selection` (the per-row mixes given to ``lora.select``)."""

import warnings

from .top_p import DEFAULT_P, WEIGHTINGS, top_p_select  # noqa: F401  (the names this module had)

warnings.warn(
    "dlplora_triton.routing.select is deprecated: import from dlplora_triton.routing (or routing.top_p)",
    DeprecationWarning,
    stacklevel=2,
)
