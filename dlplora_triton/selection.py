"""User selections -> selection tensors: names and weights per row, ``(ids, weights)`` tensors, packed offsets.

:func:`normalize_selection` validates what a user passes to ``MultiLoRA.select`` and returns a
:class:`RowSelection` (ids ``[S, P]``, weights ``[S, P]``, optional packed ``seq_offsets``), or raises
naming the row and the adapter; it changes nothing, so a failed ``select`` keeps the previous one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .ops import check_routing

__all__ = ["Selection", "RowSelection", "normalize_selection", "rows_to_tensors", "check_name"]

Selection = Sequence[Sequence[tuple[str, float]]] | tuple[torch.Tensor, torch.Tensor] | None


class RowSelection:
    """A validated selection: per-row adapter ids and weights (host or the user's device)."""

    __slots__ = ("names", "adapter_ids", "adapter_weights", "seq_offsets", "num_tokens", "adapter_mask")

    def __init__(self, names, adapter_ids, adapter_weights, seq_offsets, num_tokens):
        self.names: tuple[str, ...] = names  # adapter order the ids refer to
        self.adapter_ids: torch.Tensor = adapter_ids  # [S, P] int64, -1 = empty slot
        self.adapter_weights: torch.Tensor = adapter_weights  # [S, P] float32
        self.seq_offsets: torch.Tensor | None = seq_offsets  # [S+1] int64 for packed input, else None
        self.num_tokens: int | None = num_tokens  # packed: T = seq_offsets[-1]
        used = adapter_ids[adapter_ids >= 0].unique().tolist()
        self.adapter_mask: int = sum(1 << int(i) for i in used)  # bit i: adapter i used by some row

    @property
    def rows(self) -> int:
        return self.adapter_ids.shape[0]

    def used_names(self) -> set[str]:
        return {name for i, name in enumerate(self.names) if self.adapter_mask >> i & 1}

    def rebased(self, names: tuple[str, ...]) -> RowSelection:
        """The same selection with ids renumbered for a new adapter order (every used name must remain)."""
        index = {name: i for i, name in enumerate(names)}
        lookup = torch.tensor([index.get(n, -1) for n in self.names] + [-1], dtype=torch.long)
        ids = self.adapter_ids.long()
        remapped = lookup.to(ids.device)[torch.where(ids >= 0, ids, torch.full_like(ids, len(self.names)))]
        return RowSelection(names, remapped, self.adapter_weights, self.seq_offsets, self.num_tokens)


def check_name(name) -> str:
    """An adapter name: a non-empty string (TypeError otherwise)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter names must be non-empty strings, got {name!r}")
    return name


def normalize_selection(
    selection: Selection, names: Sequence[str], seq_offsets: torch.Tensor | None = None
) -> RowSelection | None:
    """Validate a user selection against the attached ``names`` (raises; changes nothing).

    ``selection``: one list of ``(name, weight)`` per row, ``(adapter_ids [S, P], adapter_weights
    [S, P])`` tensors with ids into ``names``, or None (base model). ``seq_offsets``: ``[S+1]`` for
    packed variable-length input. KeyError for an unknown name, ValueError for a name repeated in a
    row, a weight that is not finite or bad selection tensors, TypeError for malformed entries.
    """
    names = tuple(names)
    if selection is None:
        if seq_offsets is not None:
            raise ValueError("seq_offsets was given without a selection")
        return None
    if (
        isinstance(selection, tuple)
        and len(selection) == 2
        and all(isinstance(t, torch.Tensor) for t in selection)
    ):
        ids, weights = selection
        rows = ids.shape[0] if ids.dim() >= 1 else 0
    elif isinstance(selection, (list, tuple)):
        ids, weights = rows_to_tensors(selection, names)
        rows = len(selection)
    else:
        raise TypeError(
            "a selection is a list with one list of (name, weight) per batch row, a tuple of tensors "
            f"(adapter_ids, adapter_weights), or None; got {type(selection).__name__}"
        )
    if seq_offsets is None:
        offsets = torch.arange(rows + 1, device=ids.device)
        num_tokens = rows
    else:
        if not isinstance(seq_offsets, torch.Tensor):
            raise TypeError(f"seq_offsets must be a torch.Tensor, got {type(seq_offsets).__name__}")
        if seq_offsets.dim() != 1 or seq_offsets.numel() == 0:
            raise ValueError(
                f"seq_offsets must be [rows + 1] = [{rows + 1}], got shape {list(seq_offsets.shape)}"
            )
        offsets = seq_offsets
        num_tokens = int(seq_offsets[-1])
    check_routing(offsets, ids, weights, len(names), num_tokens)
    if ids.shape[1] > 1:
        # A name (id) twice in one row is a mistake in a selection (fused_lora itself would add it twice).
        ordered = ids.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(dim=1).nonzero()[0])
            raise ValueError(f"row {row} selects the same adapter more than once: {ids[row].tolist()}")
    packed = None if seq_offsets is None else seq_offsets.detach().clone().long()
    return RowSelection(
        names,
        ids.detach().clone().long(),
        weights.detach().to(torch.float32, copy=True),
        packed,
        num_tokens if packed is not None else None,
    )


def rows_to_tensors(rows: Sequence, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[[(name, weight), ...], ...]`` -> ``(ids [S, P] int64, weights [S, P] float32)``, -1 / 0 padded."""
    index = {name: i for i, name in enumerate(names)}
    ids_rows, weight_rows = [], []
    for s, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise TypeError(
                f"row {s} must be a list of (name, weight) pairs ([] = base model), got {type(row).__name__}"
            )
        row_ids, row_weights, seen = [], [], set()
        for entry in row:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise TypeError(f"row {s}: each entry must be a (name, weight) pair, got {entry!r}")
            name, weight = entry
            if not isinstance(name, str):
                raise TypeError(f"row {s}: adapter names are strings, got {name!r}")
            if name not in index:
                raise KeyError(f"row {s}: unknown adapter {name!r}; attached adapters: {list(names)}")
            if name in seen:
                raise ValueError(f"row {s}: adapter {name!r} appears more than once")
            seen.add(name)
            row_ids.append(index[name])
            row_weights.append(_weight(weight, s, name))
        ids_rows.append(row_ids)
        weight_rows.append(row_weights)
    P = max((len(r) for r in ids_rows), default=0)
    ids = torch.full((len(rows), P), -1, dtype=torch.long)
    weights = torch.zeros(len(rows), P, dtype=torch.float32)
    for s, (row_ids, row_weights) in enumerate(zip(ids_rows, weight_rows)):
        ids[s, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        weights[s, : len(row_weights)] = torch.tensor(row_weights, dtype=torch.float32)
    return ids, weights


def _weight(weight, row: int, name: str) -> float:
    try:
        if isinstance(weight, (bool, str, bytes)):
            raise TypeError
        w = float(weight)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"row {row}: the weight of {name!r} must be a real number, got {weight!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"row {row}: the weight of {name!r} must be finite, got {w}")
    return w
