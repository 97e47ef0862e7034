"""Names that moved in 0.2: a module's ``__getattr__`` that still finds them, at their new home, with a
``DeprecationWarning`` (kept for one release; the CHANGELOG lists them)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module``: ``moved`` maps an old name to ``"package.module:name"``."""

    def __getattr__(name: str):
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = target.partition(":")
        warnings.warn(
            f"{module}.{name} is deprecated: it moved to {where}.{new}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(where), new)

    return __getattr__
