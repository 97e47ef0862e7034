"""Top-p / top-k adapter selection: task probabilities ``[B, L]`` -> the selection tensors ``[B, P]``.

Batched tensor code, no loop over rows; the rule is in docs/routing.md ("The top-p rule").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..defaults import DEFAULT_P, DEFAULT_WEIGHTING, WEIGHTINGS
from ..route_options import check_route_options

__all__ = ["top_p_select", "WEIGHTINGS", "DEFAULT_P"]

# DEFAULT_P (0.8) and WEIGHTINGS live in dlplora_triton/defaults.py (why 0.8: there); re-exported here.


def top_p_select(
    probs: torch.Tensor, p: float = DEFAULT_P, top_k: int | None = None, weighting: str = DEFAULT_WEIGHTING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, the most likely adapters whose cumulative probability first reaches ``p``.

    Args:
        probs: ``[B, L]`` float tensor, non-negative, finite, each row summing to 1 (within
            ``1e-3 + L * eps(dtype)``; rows of raw scores or logits are rejected).
        p: in (0, 1] (default ``DEFAULT_P`` = 0.8). In descending probability (ties: lower index first), adapter ``j`` is kept iff
            the probabilities ranked above it sum to < ``p``: the one that crosses ``p`` is kept, and
            so at least one. ``p = 1`` keeps every adapter of non-zero probability.
        top_k: optional cap on the number kept per row, applied after the top-p cut.
        weighting: ``"renorm"``: kept probabilities divided by their sum; ``"softmax"``: softmax over
            the kept probabilities (DLP-LoRA's published code).

    Returns ``(ids, weights)``: ``ids [B, P]`` int64, kept adapter indices in descending probability
    order, ``-1`` in empty slots; ``weights [B, P]`` float32, 0 in empty slots, each row summing to 1;
    ``P`` = the largest number kept in any row. A zero-probability adapter is never kept. The cut is
    computed in float64 of the given values: entries that sum exactly to ``p`` end the cut.

    Semantics::

        for b in range(B):
            order = stable_argsort(-probs[b]); above = 0; kept = []
            for j in order:
                if above >= p or probs[b, j] == 0 or len(kept) == top_k: break
                kept.append(j); above += probs[b, j]

    Example::

        >>> top_p_select(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0]]), p=0.6)
        (tensor([[ 0,  1], [ 1, -1]]), tensor([[0.6250, 0.3750], [1.0000, 0.0000]]))
    """
    options = check_route_options(p=p, top_k=top_k, weighting=weighting)
    p, top_k, weighting = options.p, options.top_k, options.weighting
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor of shape [B, L], got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor, got {probs.dtype}")
    if probs.dim() != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape [B, L] with L >= 1, got {list(probs.shape)}")
    batch, num = probs.shape
    if batch == 0:
        empty = torch.empty(0, 0, device=probs.device)
        return empty.long(), empty.float()
    p64 = probs.detach().double()
    if not torch.isfinite(p64).all():
        raise ValueError("probs must be finite, got NaN or infinity")
    if (p64 < 0).any():
        raise ValueError(f"probs must be non-negative, got a minimum of {p64.min().item():.4g}")
    sums = p64.sum(dim=1)
    tolerance = 1e-3 + num * torch.finfo(probs.dtype).eps
    bad = (sums - 1).abs() > tolerance
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"probs rows must sum to 1, row {row} sums to {sums[row].item():.6g}")
    return top_p_unchecked(p64, p, top_k, weighting)


# Below this many probabilities (on CPU, "renorm"), the selection runs as Python loops: a route of one
# prompt costs 15 small tensor ops otherwise, a sixth of its time. Both ways add the same float64 values
# in the same order, so they give the same bits (tests/routing/test_router.py compares them).
_LOOP_MAX_ENTRIES = 1024


def top_p_unchecked(
    p64: torch.Tensor, p: float, top_k: int | None, weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_p_select` after its checks: ``p64`` float64 ``[B >= 1, L]`` rows of probabilities, the
    options checked. The router calls it on its own softmax, whose rows need no check."""
    if weighting == "renorm" and p64.device.type == "cpu" and p64.numel() <= _LOOP_MAX_ENTRIES:
        return _select_loops(p64, p, top_k)
    return _select_tensors(p64, p, top_k, weighting)


def _select_tensors(
    p64: torch.Tensor, p: float, top_k: int | None, weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection as batched tensor ops (any device, either weighting)."""
    # Stable descending sort: equal probabilities keep the lower adapter index first.
    sorted_p, order = torch.sort(p64, dim=1, descending=True, stable=True)
    # The mass ranked above each entry: an exclusive running sum (shifted, not cumsum - p, so that it is
    # exactly the sum of the entries above, added in order, and 0 for the first).
    above = F.pad(torch.cumsum(sorted_p[:, :-1], dim=1), (1, 0))
    keep = (above < p) & (sorted_p > 0)
    if top_k is not None:
        keep &= torch.arange(p64.shape[1], device=p64.device) < top_k
    width = int(keep.sum(dim=1).max())  # keep is a prefix of each row, so its count is its width
    keep, order, sorted_p = keep[:, :width], order[:, :width], sorted_p[:, :width]
    ids = torch.where(keep, order, -1)
    if weighting == "renorm":
        kept = torch.where(keep, sorted_p, 0.0)
        # the kept mass summed in rank order (a running sum's last entry, as _select_loops adds it)
        weights = kept / torch.cumsum(kept, dim=1)[:, -1:]
    else:
        weights = torch.softmax(torch.where(keep, sorted_p, -math.inf), dim=1)
    return ids, weights.float()


def _select_loops(p64: torch.Tensor, p: float, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select_tensors` with ``"renorm"`` as Python loops over a CPU tensor's rows."""
    ids, weights = [], []
    for row in p64.tolist():
        # sorted(reverse=True) is stable: equal probabilities keep the lower index first, as torch.sort
        kept, above = [], 0.0
        for j in sorted(range(len(row)), key=row.__getitem__, reverse=True):
            if not above < p or row[j] <= 0 or (top_k is not None and len(kept) == top_k):
                break
            kept.append(j)
            above += row[j]
        ids.append(kept)
        weights.append([row[j] / above for j in kept])  # above: the kept mass, added in rank order
    width = max(len(k) for k in ids)
    ids = [k + [-1] * (width - len(k)) for k in ids]
    weights = [w + [0.0] * (width - len(w)) for w in weights]
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(weights, dtype=torch.float32)
