"""Which modules fine-tuning adapts (PEFT's rule, :func:`dlplora_triton.modules.matches_target`) and
which it trains in full (``modules_to_save``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..modules import ALL_LINEAR, matches_target
from .layers import DynamicLoRALinear

__all__ = ["match_target_modules", "match_saved_modules"]


def match_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Paths of the modules PEFT would adapt for ``target_modules``, in model order.

    A list entry matches a path equal to it or ending in ``"." + entry``; a string is a regex that must
    match the whole path; ``"all-linear"`` picks every ``nn.Linear``. Raises ValueError for an entry that matches no module, for a match that is not
    an ``nn.Linear`` (the only type handled), and for an empty selection.
    """
    paths = [p for p, _ in model.named_modules() if p]
    modules = dict(model.named_modules())
    linear_examples = sorted({p.rsplit(".", 1)[-1] for p in paths if type(modules[p]) is nn.Linear})
    if target_modules == ALL_LINEAR:  # PEFT's shorthand (PEFT also leaves out an output layer; we do not)
        chosen = [p for p in paths if type(modules[p]) is nn.Linear]
    elif isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is an empty string")
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {err}") from None
        chosen = [p for p in paths if matches_target(p, target_modules)]
        if not chosen:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no module path; nn.Linear modules of the "
                f"model are named e.g. {linear_examples[:12]}"
            )
    else:
        entries = list(target_modules)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(
                f"target_modules must be a non-empty list of module names, got {target_modules!r}"
            )
        for entry in entries:
            if not any(matches_target(p, [entry]) for p in paths):
                raise ValueError(
                    f"target module {entry!r} matches no module of the model; nn.Linear modules of the model "
                    f"are named e.g. {linear_examples[:12]}"
                )
        chosen = [p for p in paths if matches_target(p, entries)]
    for path in chosen:
        module = modules[path]
        if isinstance(module, DynamicLoRALinear):
            raise ValueError(f"module {path!r} already carries a DynamicLoRA adapter")
        if type(module) is not nn.Linear:
            raise ValueError(
                f"target module {path!r} is a {type(module).__name__}; DynamicLoRA adapts nn.Linear modules only"
            )
    return chosen


def match_saved_modules(model: nn.Module, names: Sequence[str] | None, lora_paths: list[str]) -> list[str]:
    """The outermost modules PEFT's ``modules_to_save`` rule picks for ``names`` (none may hold a LoRA)."""
    if not names:
        return []
    if isinstance(names, str):
        raise ValueError(f"modules_to_save must be a list of module names, got the string {names!r}")
    paths = [p for p, _ in model.named_modules() if p]
    chosen = []
    for name in names:
        hits = [p for p in paths if matches_target(p, [name])]
        if not hits:
            raise ValueError(f"modules_to_save entry {name!r} matches no module of the model")
        chosen += [h for h in hits if h not in chosen]
    for path in chosen:
        if any(path == lp or path.startswith(lp + ".") or lp.startswith(path + ".") for lp in lora_paths):
            raise ValueError(f"module {path!r} is both adapted by LoRA and in modules_to_save")
    # PEFT wraps only the outermost match; inner matches are part of it.
    return [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]
