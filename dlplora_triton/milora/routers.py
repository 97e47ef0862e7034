"""MiLoRA's per-layer routers: pool the prompt, a learnable activation, Top-k(softmax(g(h) W_r)).

One :class:`LayerRouter` per decoder layer reads that layer's input hidden states ``[B, T, H]`` and a
prompt mask ``[B, T]`` and returns, per row, the softmax probabilities over the layer's ``M`` LoRA
modules and the gates (the top-k probabilities, 0 elsewhere). The same code runs in training
(:class:`~dlplora_triton.milora.MiLoRA`) and in serving (``dlplora_triton.milora.serving``), always in
float32, so served gates equal trained gates. The math and the choices are in docs/milora.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POOLINGS", "SwishBeta", "LayerRouter", "balance_loss", "check_pooling", "check_top_k"]

POOLINGS = ("attention", "mean", "max", "last")


def check_pooling(pooling) -> str:
    """``pooling`` if it is one of :data:`POOLINGS`, else ValueError."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    return pooling


def check_top_k(top_k, num_modules: int) -> int:
    """``top_k`` if it is an int in ``1..num_modules``, else ValueError."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_modules:
        raise ValueError(
            f"top_k must be an integer in 1..{num_modules} (the number of LoRA modules per layer), got {top_k!r}"
        )
    return top_k


class SwishBeta(nn.Module):
    """The learnable activation ``g(z) = z * sigmoid(beta * z)``, one ``beta`` per feature (init 1: SiLU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(self.beta * z)


class LayerRouter(nn.Module):
    """The router of one decoder layer over its ``num_modules`` LoRA modules.

    ``forward(hidden [B, T, H], mask [B, T] bool)`` -> ``(probs [B, M], gates [B, M])``, float32:

        u[b, t]  = LayerNorm(hidden[b, t])                     (no affine: scale-free input)
        p[b]     = pool(u[b, t] for t with mask[b, t])          (attention / mean / max / last)
        probs[b] = softmax(g(p[b]) @ W_r^T)                     (g: SwishBeta, W_r [M, H])
        gates[b] = probs[b] on its top_k modules, 0 elsewhere

    Attention pooling: ``softmax_t(u[b, t] . q / sqrt(H))`` weights with a learnable query ``q``
    (zeros at init, so it starts as mean pooling). Every row needs at least one prompt token.
    """

    def __init__(self, hidden_size: int, num_modules: int, top_k: int, pooling: str = "attention"):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.num_modules = int(num_modules)
        self.top_k = check_top_k(top_k, self.num_modules)
        self.pooling = check_pooling(pooling)
        self.query = nn.Parameter(torch.zeros(hidden_size)) if pooling == "attention" else None
        self.act = SwishBeta(hidden_size)
        self.proj = nn.Linear(hidden_size, num_modules, bias=False)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` hidden states, ``[B, T]`` bool mask -> ``[B, H]`` float32 pooled prompt."""
        u = F.layer_norm(hidden.float(), (self.hidden_size,))
        mask = mask.to(device=u.device, dtype=torch.bool)
        if self.pooling == "mean":
            m = mask.to(u.dtype)
            return (m.unsqueeze(-1) * u).sum(1) / m.sum(1, keepdim=True)
        if self.pooling == "max":
            return u.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        if self.pooling == "last":
            positions = torch.arange(mask.shape[1], device=u.device).expand_as(mask)
            last = torch.where(mask, positions, -1).amax(1)  # the last prompt token of each row
            return u[torch.arange(u.shape[0], device=u.device), last]
        scores = (u @ self.query) / math.sqrt(self.hidden_size)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return torch.einsum("bt,bth->bh", weights, u)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(hidden, mask)
        probs = torch.softmax(self.proj(self.act(pooled)), dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, top)
        return probs, gates


def balance_loss(probs: torch.Tensor, gates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style load balance of one layer: ``M * sum_m f_m * P_m`` (1 when perfectly balanced).

    ``probs`` / ``gates`` ``[B, M]``; ``f_m``: the fraction of the batch's top-k picks that went to module
    ``m``; ``P_m``: the mean probability of ``m``. Gradients flow through ``P_m`` only.
    """
    M = probs.shape[-1]
    picked = (gates > 0).to(probs.dtype)
    f = picked.mean(0) / top_k
    P = probs.mean(0)
    return M * (f * P).sum()
