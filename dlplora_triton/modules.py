"""What a LoRA can wrap, swapping a child module by dotted path, and PEFT's target-module rule.

One place for three small jobs that loading (``adapters``), serving (``layers``, ``patch``) and
fine-tuning (``finetune``) share. Imports only torch (transformers' ``Conv1D`` is imported lazily), so
every module of the package may import this one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["linear_features", "is_conv1d", "set_child", "matches_target", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"  # PEFT's shorthand for "every linear layer" (a string, but not a regex)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a module a LoRA can wrap, or None.

    Handles ``nn.Linear`` (weight ``[N, K]``) and transformers' GPT-2 ``Conv1D`` (weight ``[K, N]``),
    recognised by type, with a floating-point 2-D weight (quantised layers are not handled).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return None
    if isinstance(module, nn.Linear):
        if tuple(weight.shape) != (module.out_features, module.in_features):
            return None
        return module.in_features, module.out_features
    if is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    return None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the helpers work on plain torch models too
        return False
    return isinstance(module, Conv1D)


def set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (e.g. ``"layers.0.q_proj"``) of ``model`` by ``module``.

    Raises AttributeError (torch's, naming the missing part) when the parent path does not exist.
    """
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def forward_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The token tensor a model's forward pre-hook sees: ``input_ids``, ``inputs_embeds`` or the first
    positional tensor; ``None`` when there is none of at least two dimensions ``[B, T, ...]``."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    return x if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def matches_target(
    path: str,
    target_modules: Sequence[str] | str,
    *,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    exclude_modules: Sequence[str] | str | None = None,
) -> bool:
    """Whether PEFT would adapt the module at ``path`` (PEFT's ``check_target_module_exists``).

    - ``exclude_modules`` first: a string is a full-match regex; a list matches a path equal to an entry
      or ending in ``"." + entry``.
    - ``target_modules``: a string is a full-match regex (``"all-linear"`` matches every path: callers
      keep only modules :func:`linear_features` accepts); a list matches as ``exclude_modules`` does.
    - For a list only (as in PEFT), ``layers_to_transform`` (an int or a list of them; None or [] for
      all layers) keeps paths whose layer index is listed: the number after ``layers_pattern`` (a name
      or names, e.g. ``"layers"``), or without a pattern the first numbered segment (PEFT's rule).
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, path):
                return False
        elif path in exclude_modules or any(path.endswith(f".{e}") for e in exclude_modules):
            return False
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR or re.fullmatch(target_modules, path) is not None
    if path in target_modules:
        return True
    if not any(path.endswith(f".{t}") for t in target_modules):
        return False
    if layers_to_transform is None or (
        not isinstance(layers_to_transform, int) and len(layers_to_transform) == 0
    ):
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform
