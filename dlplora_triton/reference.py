"""PyTorch implementations of the fused multi-LoRA delta.

- :func:`fused_lora_torch`: the PyTorch backend (CPU default). It walks the plan's groups: one
  shrink and one expand matmul per distinct adapter in the batch, slices instead of gathers where an
  adapter's rows are consecutive tokens. No loop over sequences or tokens.
- :func:`fused_lora_reference`: the oracle the tests run in float64, written as plainly as the math.

Semantics (both)::

    for s in range(S):
        for p in range(P):
            i = adapter_ids[s, p]
            if i < 0: continue
            r = ranks[i]
            t = slice(seq_offsets[s], seq_offsets[s + 1])
            y[t] += adapter_weights[s, p] * scales[i] * (x[t] @ lora_a[i, :r].T) @ lora_b[i, :, :r].T
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import LoRAPlan

__all__ = ["fused_lora_torch", "fused_lora_reference"]


def fused_lora_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    out: torch.Tensor,
    ranks: Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Add the fused LoRA delta of ``plan`` into ``out`` ``[T, N]`` in place (PyTorch backend).

    ``ranks`` and ``scales`` are host sequences of length ``L`` (or None: full rank, scale 1).
    """
    for group in plan.host_groups():
        a = group.adapter
        r = lora_a.shape[1] if ranks is None else int(ranks[a])
        if r == 0:
            continue
        weights = group.weights.to(x.dtype)
        if scales is not None:
            weights = weights * scales[a]
        shrink_w = lora_a[a, :r].t()
        expand_w = lora_b[a, :, :r].t()
        if group.contiguous:
            v = torch.mm(x[group.start : group.stop], shrink_w).mul_(weights)
            out[group.start : group.stop].addmm_(v, expand_w)
        else:
            v = torch.mm(x.index_select(0, group.tokens), shrink_w).mul_(weights)
            out.index_add_(0, group.tokens, torch.mm(v, expand_w))
    return out


def fused_lora_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    ranks: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA delta ``[T, N]`` by the definition (a loop over sequences and slots); the tests' oracle."""
    T, N = x.shape[0], lora_b.shape[1]
    y = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    for s in range(adapter_ids.shape[0]):
        t = slice(int(seq_offsets[s]), int(seq_offsets[s + 1]))
        for p in range(adapter_ids.shape[1]):
            i = int(adapter_ids[s, p])
            if i < 0:
                continue
            r = lora_a.shape[1] if ranks is None else int(ranks[i])
            scale = 1.0 if scales is None else float(scales[i])
            weight = float(adapter_weights[s, p]) * scale
            y[t] += weight * (x[t] @ lora_a[i, :r].T) @ lora_b[i, :, :r].T
    return y
