"""The fused multi-LoRA delta written as plainly as the math: the float64 oracle of the tests and benches.

Semantics::

    for s in range(S):
        for p in range(P):
            i = adapter_ids[s, p]
            if i < 0: continue
            r = ranks[i]
            t = slice(seq_offsets[s], seq_offsets[s + 1])
            y[t] += adapter_weights[s, p] * scales[i] * (x[t] @ lora_a[i, :r].T) @ lora_b[i, :, :r].T
"""

from __future__ import annotations

import torch

__all__ = ["fused_lora_reference"]


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
